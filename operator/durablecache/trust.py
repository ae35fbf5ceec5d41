"""Which servers the migration trusts, watched for the whole migration and checked before every FLIP.

Equality between the sides is established by the copy and by each verify-and-repair; what it was
established *with* is the identity of every primary on both sides at that moment (witness.py). A
server that restarts, fails over or is replaced afterwards may hold anything — nothing, or old data —
so the migration is told (``on_change``), demands a verify-and-repair, and no cutover trusts that side
until the repair re-established equality. Clients that write to the authoritative side around the
proxy are looked for here too, for as long as the source is authoritative.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from . import logs
from .errors import ConnectError, DurableCacheError
from .gate import foreign_clients_by_id
from .topology import Topology
from .witness import NodeIdentity, SideReading, SideWatch, count_mismatch, from_state, identity_changes

log = logs.get("durablecache.trust")
SIDES = ("source", "target")
ChangeCallback = Callable[[str, list[str]], None]   # (side, what changed)
ClientsCallback = Callable[[list[str]], None]       # clients seen on the source around the proxy


class Trust:
    def __init__(self, source: Topology, target: Topology, state: dict[str, Any], *, on_change: ChangeCallback,
                 on_clients: ClientsCallback, allow_clients: Sequence[str] = ()):
        self.watches = {"source": SideWatch(source, "source"), "target": SideWatch(target, "target")}
        self.topologies = {"source": source, "target": target}
        self.state = state          # the migration's state: trusted identities survive a restart
        self.on_change = on_change
        self.on_clients = on_clients
        self.allow_clients = list(allow_clients)
        self.reported: dict[str, tuple[NodeIdentity, ...]] = {}
        self.direct_clients: list[str] = []
        self._candidates: set[str] = set()       # foreign clients seen on the last look only
        self._looking = asyncio.Lock()
        self.unreachable: dict[str, str] = {}

    # -- trusted identities -----------------------------------------------------------------------
    def trusted(self, side: str) -> tuple[NodeIdentity, ...] | None:
        return from_state((self.state.get("trusted") or {}).get(side))

    async def establish(self) -> dict[str, SideReading]:
        """The sides as they are now are the ones the copy or repair about to run makes equal."""
        await asyncio.gather(*(w.refresh() for w in self.watches.values()))
        readings = await self._read_both()
        for side, reading in readings.items():
            replicas = [n.address for n in reading.nodes if n.role != "master"]
            if replicas:   # a failover under way: equality with a replica would be equality with nothing
                raise ConnectError(f"the {side}'s {', '.join(replicas)} is a replica now (a failover): waiting "
                                   "until its address leads to a primary again")
        self.state["trusted"] = {side: r.as_state() for side, r in readings.items()}
        self.reported = {side: r.nodes for side, r in readings.items()}
        return readings

    async def changes_since_trusted(self) -> dict[str, list[str]]:
        """Per side, what changed since equality was last established (sides without a change left out).
        Reports each new change once through on_change."""
        out: dict[str, list[str]] = {}
        for side, reading in (await self._read_both()).items():
            changed = self._compare(side, reading)
            if changed:
                out[side] = changed
        return out

    def _compare(self, side: str, reading: SideReading) -> list[str]:
        trusted = self.trusted(side)
        if trusted is None:
            return []
        changed = identity_changes(trusted, reading.nodes)
        if changed and self.reported.get(side) != reading.nodes:
            self.reported[side] = reading.nodes
            self.on_change(side, changed)
        return changed

    async def _read_both(self, timeout: float = 5.0) -> dict[str, SideReading]:
        src, dst = await asyncio.gather(self.watches["source"].read(timeout), self.watches["target"].read(timeout))
        return {"source": src, "target": dst}

    # -- the last check before FLIP ---------------------------------------------------------------
    async def before_flip(self, authoritative: str, timeout: float) -> str | None:
        """Inside the write pause, after the drain: why the sides cannot be trusted to be equal now
        (None: they can). Same servers as at the last repair, and the same key counts."""
        try:
            readings = await self._read_both(timeout=max(timeout, 0.005))
        except (DurableCacheError, OSError, TimeoutError, RuntimeError) as exc:
            return f"the last check before FLIP could not read both sides: {exc}"
        for side, reading in readings.items():
            changed = self._compare(side, reading)
            if changed:
                return f"the {side} changed since the last repair: {'; '.join(changed)}"
        other = "target" if authoritative == "source" else "source"
        mismatch = count_mismatch(readings[authoritative], readings[other], authoritative, other)
        return f"the sides differ after the drain: {mismatch}" if mismatch else None

    # -- watching ---------------------------------------------------------------------------------
    async def watch(self, interval: float, source_authoritative: Callable[[], bool]) -> None:
        """Every ``interval`` seconds: did a server change? Does anyone write to the source around the
        proxy (while it is authoritative)? Runs until cancelled; a side that cannot be reached is
        logged once per outage and looked at again."""
        for _ in range(1 << 62):   # until cancelled
            started = time.monotonic()
            for side in SIDES:
                try:
                    reading = await self.watches[side].read()
                except Exception as exc:  # noqa: BLE001 — whatever a fault throws, the watch goes on
                    if side not in self.unreachable:
                        log.warning("side unreachable", side=side, error=str(exc) or type(exc).__name__)
                    self.unreachable[side] = str(exc)
                    continue
                if self.unreachable.pop(side, None):
                    log.info("side reachable again", side=side)
                self._compare(side, reading)   # a failure here is a bug, not a fault: it ends the watch
            if source_authoritative():
                await self.look_for_direct_clients()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    @contextlib.asynccontextmanager
    async def no_looks(self) -> AsyncIterator[None]:
        """No CLIENT LIST while inside: a cutover's write pause must not wait for one (with 5,000
        clients its reply takes tens of milliseconds to read and parse, on the coordinator's only
        thread). An attempt checks for direct clients itself just before it begins."""
        async with self._looking:
            yield

    async def look_for_direct_clients(self) -> bool:
        """CLIENT LIST on every source primary: clients other than ours, replicas and allow-listed ones.
        A client counts once it was seen on two looks in a row: one of our own connections is unnamed
        for the moment between its connect and its CLIENT SETNAME. True while any is seen (confirmed
        or not): no cutover may start then."""
        try:
            async with self._looking:     # the watch and a cutover attempt may look at once
                found = await foreign_clients_by_id(self.topologies["source"], self.allow_clients)
        except (DurableCacheError, OSError, TimeoutError, RuntimeError) as exc:
            log.warning("cannot list the source's clients", error=str(exc))
            return bool(self.direct_clients or self._candidates)
        confirmed = sorted(desc for cid, desc in found.items() if cid in self._candidates)
        self._candidates = set(found)
        if confirmed != self.direct_clients:
            self.direct_clients = confirmed
            self.on_clients(confirmed)
        return bool(found)

    async def close(self) -> None:
        for w in self.watches.values():
            with contextlib.suppress(Exception):
                await w.close()
