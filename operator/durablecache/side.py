"""One side of a migration (source or target): its topology and a worker's connections to it."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .resp import Command, Connection, ReplyError
from .topology import Topology, discover

MAX_REDIRECTS = 5


class Side:
    """Routes commands by key to the primary that owns it; one connection per (primary, db).

    Not shared between tasks: every worker builds its own Side (they share the Topology object).
    """

    def __init__(self, topology: Topology, name: str):
        self.topology = topology
        self.name = name
        self._conns: dict[tuple[int, int], Connection] = {}

    async def conn(self, primary: int, db: int) -> Connection:
        key = (primary, db)
        conn = self._conns.get(key)
        if conn is not None and not conn.usable:  # a failover, an idle timeout, a reply we gave up on
            await conn.close()
            conn = None
        if conn is None:
            endpoint = self.topology.primaries[primary]
            conn = await Connection.open(endpoint, name=self.name, select_db=db)
            self._conns[key] = conn
        return conn

    async def refresh(self) -> None:
        """Re-read the slot map after a MOVED reply (resharding or failover)."""
        await self.close()
        fresh = await discover(self.topology.seed, name=self.name)
        self.topology.primaries = fresh.primaries
        self.topology.slot_owner = fresh.slot_owner

    async def per_key(self, db: int, keys: Sequence[bytes], build: Any, per: int) -> list[list[Any]]:
        """Run ``build(key)`` (a list of ``per`` commands) for every key, pipelined per primary.

        Returns, per key, its ``per`` replies. MOVED/ASK (a slot moved under us) refreshes the
        topology and retries those keys, a bounded number of times.
        """
        results: list[list[Any] | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for _attempt in range(MAX_REDIRECTS):
            groups: dict[int, list[int]] = defaultdict(list)
            for i in todo:
                groups[self.topology.primary_for(keys[i])].append(i)
            replies = await asyncio.gather(*(self._run_group(p, db, idxs, keys, build) for p, idxs in groups.items()))
            moved = []
            for idxs, group_replies in zip(groups.values(), replies):
                for n, i in enumerate(idxs):
                    chunk = group_replies[n * per:(n + 1) * per]
                    if any(_is_redirect(r) for r in chunk):
                        moved.append(i)
                    else:
                        results[i] = chunk
            if not moved:
                return results  # type: ignore[return-value]
            todo = moved
            await self.refresh()
            await asyncio.sleep(0.05 * (_attempt + 1))  # ASK: the slot is mid-migration; give it a moment
        raise RuntimeError(f"{self.name}: keys kept moving between primaries ({len(todo)} keys)")

    async def _run_group(self, primary: int, db: int, idxs: list[int], keys: Sequence[bytes], build: Any) -> list[Any]:
        conn = await self.conn(primary, db)
        commands: list[Command] = []
        for i in idxs:
            commands.extend(build(keys[i]))
        return await conn.pipeline(commands)

    def by_primary(self, keys: Sequence[bytes]) -> dict[int, list[bytes]]:
        """Keys grouped by the primary that owns them."""
        if not self.topology.cluster:  # one primary: no per-key routing
            return {0: list(keys)}
        groups: dict[int, list[bytes]] = defaultdict(list)
        for k in keys:
            groups[self.topology.primary_for(k)].append(k)
        return groups

    async def on_key(self, db: int, key: bytes, *commands: Command) -> list[Any]:
        """Commands for one key, pipelined; follows MOVED like per_key."""
        out = await self.per_key(db, [key], lambda _k: list(commands), len(commands))
        return out[0]

    async def close(self) -> None:
        conns, self._conns = self._conns, {}
        for c in conns.values():
            await c.close()


def _is_redirect(reply: Any) -> bool:
    return isinstance(reply, ReplyError) and str(reply).startswith(("MOVED", "ASK"))
