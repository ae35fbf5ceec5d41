"""The RouteIn gate: before the copy starts, nobody may write to the source around the proxy.

CLIENT LIST on every source primary must show only our own connections (named ``durablecache-*``),
replication links (flags S/M) and allow-listed clients (by name or address host), continuously for
a settle period. Anything else blocks the gate, named by address and client name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from .errors import RefusedError
from .resp import Connection
from .topology import Topology

OWN_PREFIX = "durablecache-"


def others_in_client_list(text: bytes | str) -> list[dict[str, str]]:
    """CLIENT LIST's lines as dicts, but for our own connections, left out unparsed: with thousands of
    proxy connections a full parse took tens of milliseconds, on the thread that may also serve those
    clients (a client name cannot hold a space, so " name=" starts the name field)."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    own = " name=" + OWN_PREFIX
    clients = []
    for line in text.splitlines():
        if own in line:
            continue
        fields = dict(part.split("=", 1) for part in line.split(" ") if "=" in part)
        if fields:
            clients.append(fields)
    return clients


def is_foreign(client: dict[str, str], allow: Sequence[str]) -> bool:
    name, flags = client.get("name", ""), client.get("flags", "")
    if name.startswith(OWN_PREFIX) or "S" in flags or "M" in flags:
        return False
    host = client.get("addr", "").rsplit(":", 1)[0]
    return not (name and name in allow) and host not in allow


async def foreign_clients(topo: Topology, allow: Sequence[str]) -> list[str]:
    return list((await foreign_clients_by_id(topo, allow)).values())


async def foreign_clients_by_id(topo: Topology, allow: Sequence[str]) -> dict[str, str]:
    """Foreign clients on every primary: "node#client-id" -> "addr (name=…, on node)"."""
    found = {}
    for node in topo.primaries:
        conn = await Connection.open(node, name="durablecache-gate", select_db=0)
        try:
            for c in others_in_client_list(await conn.call("CLIENT", "LIST")):
                if is_foreign(c, allow):
                    found[f"{node.address}#{c.get('id', '?')}"] = \
                        f"{c.get('addr', '?')} (name={c.get('name') or '-'}, on {node.address})"
        finally:
            await conn.close()
    return found


async def wait_for_gate(topo: Topology, allow: Sequence[str], settle: float, timeout: float,
                        poll: float = 0.2, on_blocked=None) -> None:  # type: ignore[no-untyped-def]
    """Return once no foreign client was seen for `settle` seconds; RefusedError after `timeout`."""
    deadline = time.monotonic() + timeout
    clear_since: float | None = None
    last: list[str] = []
    while time.monotonic() < deadline:
        last = await foreign_clients(topo, allow)
        now = time.monotonic()
        if last:
            clear_since = None
            if on_blocked:
                on_blocked(last)
        else:
            clear_since = clear_since or now
            if now - clear_since >= settle:
                return
        await asyncio.sleep(poll)
    raise RefusedError(f"clients still connect to the source directly after {timeout:.0f}s: "
                       f"{', '.join(last[:5])}{' …' if len(last) > 5 else ''}; point them at the proxy "
                       "or allow-list read-only ones")
