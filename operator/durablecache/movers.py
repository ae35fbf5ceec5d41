"""A pool of KeyMovers: each owns its own connections, so concurrent batches never share a socket."""

from __future__ import annotations

import asyncio
from collections.abc import Container

from .keymover import KeyMover, MoveResult, MoverOptions
from .ratelimit import TokenBucket
from .side import Side
from .topology import Topology

MiB = 1 << 20
# ElastiCache durable clusters accept at most 100 MiB/s of writes per primary; stay below it.
DEFAULT_TARGET_BYTES_PER_PRIMARY = 80 * MiB


class MoverPool:
    def __init__(self, source: Topology, target: Topology, size: int, opts: MoverOptions,
                 max_source_ops: float | None = None,
                 max_target_bytes: float | None = DEFAULT_TARGET_BYTES_PER_PRIMARY,
                 name: str = "durablecache-copy"):
        self.source = source
        self.target = target
        ops = TokenBucket(max_source_ops)
        buckets = {i: TokenBucket(max_target_bytes) for i in range(len(target.primaries))} if max_target_bytes else {}
        self.target_buckets = list(buckets.values())   # what laggovernor.LagGovernor turns down and up
        self._all = [KeyMover(Side(source, name), Side(target, name), opts, ops, buckets) for _ in range(size)]
        self._free: asyncio.Queue[KeyMover] = asyncio.Queue()
        for m in self._all:
            self._free.put_nowait(m)

    async def move(self, db: int, keys: list[bytes], strings: Container[bytes] = frozenset()) -> MoveResult:
        """Copy keys with whichever mover is free (the copier's and the syncer's unit of work)."""
        m = await self._free.get()
        try:
            return await m.move(db, keys, strings)
        finally:
            self._free.put_nowait(m)

    async def move_members(self, db: int, parts: dict[bytes, list[bytes]]) -> MoveResult:
        """Copy the named members of keys (KeyMover.move_members) with whichever mover is free."""
        m = await self._free.get()
        try:
            return await m.move_members(db, parts)
        finally:
            self._free.put_nowait(m)

    async def close(self) -> None:
        for m in self._all:
            await m.src.close()
            await m.dst.close()
