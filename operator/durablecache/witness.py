"""Who the servers of one side are, and a cheap witness of what they hold.

A side is trusted only while its primaries are the servers that were there when equality with the
other side was last established (by the copy or by a verify-and-repair). A server that restarted
(a new ``run_id``), a primary that became a replica (a failover), or a node replaced under the same
address puts that side's data in doubt: it may have come back empty, or with old data, and nothing
else in the protocol would notice. See docs/protocol.md, "Faults around DurableCache".

The witness is what the cutover checks inside its pause, right before FLIP: both sides are the same
servers as at the last repair, and they hold the same number of keys per database. Keys without an
expiry must match exactly (after the drain nothing is dirty and nothing is written); keys with an
expiry may differ by the ones that expired on one side and were not reclaimed yet on the other (the
servers' active expiry aims to keep those under a tenth of the volatile keys).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from .errors import DurableCacheError
from .resp import Connection, ReplyError, text
from .topology import Topology, discover, keyspace_counts, parse_info
from .urls import Endpoint

# Volatile keys may differ by this share of the larger count, plus a few, between two equal sides.
VOLATILE_SLACK_SHARE = 0.10
VOLATILE_SLACK_MIN = 16
CONNECTION_NAME = "durablecache-witness"


@dataclasses.dataclass(frozen=True)
class NodeIdentity:
    address: str
    run_id: str
    role: str           # "master" or "slave": a primary that turned replica was failed over
    node_id: str = ""   # cluster mode: CLUSTER MYID

    def describe(self) -> str:
        node = f" node {self.node_id[:8]}" if self.node_id else ""
        return f"{self.address}{node} (run_id {self.run_id[:8]}, {self.role})"


@dataclasses.dataclass
class SideReading:
    """One look at every primary of a side: who they are, and their keys per db (summed)."""

    nodes: tuple[NodeIdentity, ...]
    keys: dict[int, int]          # db -> keys
    volatile: dict[int, int]      # db -> keys with an expiry

    def persistent(self, db: int) -> int:
        return self.keys.get(db, 0) - self.volatile.get(db, 0)

    def as_state(self) -> list[dict[str, str]]:
        return [dataclasses.asdict(n) for n in self.nodes]


def identity_changes(trusted: tuple[NodeIdentity, ...], now: tuple[NodeIdentity, ...]) -> list[str]:
    """What differs between the trusted primaries and the current ones, in words (empty: nothing)."""
    current = {n.address: n for n in now}
    out = []
    for old in trusted:
        new = current.pop(old.address, None)
        if new is None:
            out.append(f"{old.address} is no longer a primary (a failover or a node removed)")
        elif old.run_id != new.run_id:
            out.append(f"{old.address} restarted or was replaced (run_id {old.run_id[:8]} -> {new.run_id[:8]})")
        elif old.node_id and new.node_id and old.node_id != new.node_id:
            out.append(f"{old.address} is another cluster node now ({old.node_id[:8]} -> {new.node_id[:8]})")
        elif old.role != new.role:
            out.append(f"{old.address} is a {new.role} now, not a {old.role} (a failover)")
    out.extend(f"{address} is a primary now (a failover or a node added)" for address in current)
    return out


def from_state(raw: Any) -> tuple[NodeIdentity, ...] | None:
    """Identities saved with SideReading.as_state(); None when absent or unreadable."""
    if not isinstance(raw, list):
        return None
    try:
        return tuple(NodeIdentity(**item) for item in raw)
    except TypeError:
        return None


def count_mismatch(a: SideReading, b: SideReading, a_name: str, b_name: str) -> str | None:
    """Why two sides that should be equal cannot be, from their key counts (None: they may be)."""
    for db in sorted(set(a.keys) | set(b.keys)):
        pa, pb = a.persistent(db), b.persistent(db)
        if pa != pb:
            return (f"db {db}: {pa} keys without expiry on the {a_name}, {pb} on the {b_name}")
        va, vb = a.volatile.get(db, 0), b.volatile.get(db, 0)
        slack = VOLATILE_SLACK_MIN + int(VOLATILE_SLACK_SHARE * max(va, vb))
        if abs(va - vb) > slack:
            return (f"db {db}: {va} keys with an expiry on the {a_name}, {vb} on the {b_name} "
                    f"(more apart than expiry alone explains: {slack})")
    return None


class SideWatch:
    """Long-lived connections to every primary of one side, to read identities and key counts
    quickly enough to do it inside a cutover's write pause."""

    def __init__(self, topology: Topology, side: str):
        self.topology = topology
        self.side = side
        self._conns: dict[str, Connection] = {}    # by address: the primaries may change (a failover)
        self._lock = asyncio.Lock()                # the watch and a repair or a cutover may read at once

    async def _conn(self, endpoint: Endpoint) -> Connection:
        conn = self._conns.get(endpoint.address)
        if conn is not None and not conn.usable:
            await conn.close()
            conn = None
        if conn is None:
            conn = await Connection.open(endpoint, name=CONNECTION_NAME, select_db=0)
            self._conns[endpoint.address] = conn
        return conn

    async def refresh(self) -> None:
        """Re-read a cluster's slot map (a failover or a reshard since): the primaries to trust now."""
        if not self.topology.cluster:
            return
        fresh = await discover(self.topology.seed, name=CONNECTION_NAME)
        self.topology.primaries = fresh.primaries
        self.topology.slot_owner = fresh.slot_owner

    async def read(self, timeout: float = 5.0) -> SideReading:
        """Read every primary at once; ConnectError when one cannot be reached."""
        primaries = list(self.topology.primaries)
        async with self._lock:
            replies = await asyncio.gather(*(self._read_one(ep, timeout) for ep in primaries))
        keys: dict[int, int] = {}
        volatile: dict[int, int] = {}
        nodes = []
        for node, k, v in replies:
            nodes.append(node)
            for db, n in k.items():
                keys[db] = keys.get(db, 0) + n
            for db, n in v.items():
                volatile[db] = volatile.get(db, 0) + n
        return SideReading(tuple(nodes), keys, volatile)

    async def _read_one(self, endpoint: Endpoint, timeout: float) -> tuple[NodeIdentity, dict[int, int],
                                                                            dict[int, int]]:
        conn = await self._conn(endpoint)
        commands: list[tuple[Any, ...]] = [("INFO", "server"), ("INFO", "replication"), ("INFO", "keyspace")]
        if self.topology.cluster:
            commands.append(("CLUSTER", "MYID"))
        replies = await conn.pipeline(commands, timeout=timeout)
        for r in replies[:3]:
            if isinstance(r, ReplyError):
                raise DurableCacheError(f"{endpoint.address}: INFO failed: {r}")
        info = parse_info(replies[0])
        role = parse_info(replies[1]).get("role", "?")
        node_id = text(replies[3]) if len(replies) > 3 and not isinstance(replies[3], ReplyError) else ""
        space = parse_info(replies[2])
        keys = keyspace_counts(space)
        volatile = keyspace_counts(space, "expires")
        return NodeIdentity(endpoint.address, info.get("run_id", ""), role, node_id), keys, volatile

    async def close(self) -> None:
        conns, self._conns = self._conns, {}
        for c in conns.values():
            await c.close()
