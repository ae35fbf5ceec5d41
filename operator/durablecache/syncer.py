"""The syncer: the one owner of copying. Every key that must be copied — a live write marked by a
proxy, or a key found by the bulk copy or by a repair pass — goes through here.

Invariant kept (DESIGN.md): a key stays dirty until a copy of it *started after its last mark* has
finished. A key marked while its copy is in flight is copied again afterwards, so two copies of
one key never race and a stale value can never land last.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterable

from . import logs
from .keymover import MoveResult
from .movers import MoverPool

log = logs.get("durablecache.syncer")
DirtyKey = tuple[int, bytes]  # (db, key)


@dataclasses.dataclass
class SyncStats:
    marks: int = 0
    copied: int = 0
    deleted: int = 0
    bytes: int = 0
    batches: int = 0
    overflowed: int = 0


class Syncer:
    def __init__(self, pool: MoverPool, *, workers: int = 4, batch: int = 500, max_dirty: int = 2_000_000):
        self.pool = pool
        self.workers = workers
        self.batch = batch
        self.max_dirty = max_dirty
        self.stats = SyncStats()
        # Keys waiting for a copy, in arrival order (a dict is an ordered set).
        self._dirty: dict[DirtyKey, None] = {}
        self._in_flight: set[DirtyKey] = set()
        self._again: set[DirtyKey] = set()  # marked while in flight: copy once more afterwards
        self._waiters: dict[DirtyKey, list[asyncio.Future[None]]] = {}
        self._work = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._paused = False
        self.failure: BaseException | None = None
        # Why the next cutover must be preceded by a full verify-and-repair (None: not needed).
        self.repair_reason: str | None = None

    # -- marking ---------------------------------------------------------------------------------
    def mark(self, db: int, keys: Iterable[bytes]) -> None:
        """Record keys as dirty. Never blocks; past max_dirty it records an overflow instead."""
        if isinstance(keys, bytes | str):
            raise TypeError("mark() takes an iterable of keys, not one key")
        for key in keys:
            self.stats.marks += 1
            dk = (db, key)
            if dk in self._in_flight:
                self._again.add(dk)
            elif dk not in self._dirty:
                if len(self._dirty) >= self.max_dirty:
                    self.stats.overflowed += 1
                    self.require_repair(f"dirty-key backlog exceeded {self.max_dirty} keys")
                    continue
                self._dirty[dk] = None
        if self._dirty:
            self._idle.clear()
            self._work.set()

    async def on_marks(self, db: int, keys: list[bytes]) -> None:
        """The proxies' MarkCallback: delivered once it returns."""
        self.mark(db, keys)

    async def copy_now(self, db: int, keys: list[bytes]) -> MoveResult:
        """Bulk copy entry: mark and wait until each key was copied by a copy started after now.

        Waits for room first, so the bulk copy can never overflow the backlog."""
        for _ in range(100_000):
            if len(self._dirty) + len(keys) <= self.max_dirty // 2:
                break
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        futures = []
        for key in keys:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault((db, key), []).append(fut)
            futures.append(fut)
        self.mark(db, keys)
        await asyncio.gather(*futures)
        # Keys of one call may share batches with live marks: bytes are only counted in self.stats.
        return MoveResult(copied=len(keys))

    def require_repair(self, reason: str) -> None:
        if self.repair_reason is None:
            log.warning("full verify-and-repair required before cutover", reason=reason)
            self.repair_reason = reason

    # -- state -----------------------------------------------------------------------------------
    @property
    def backlog(self) -> int:
        return len(self._dirty) + len(self._in_flight) + len(self._again)

    def empty(self) -> bool:
        return self.backlog == 0

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is dirty or in flight; False if that took longer than timeout."""
        try:
            async with asyncio.timeout(timeout):
                while not self.empty():
                    self._raise_failure()
                    await self._idle.wait()
        except TimeoutError:
            return False
        self._raise_failure()
        return True

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    # -- workers ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def switch_pool(self, pool: MoverPool) -> None:
        """Copy the other way from now on (after FLIP). Only called while the backlog is empty."""
        assert self.empty(), "switching direction with keys still dirty would lose them"
        old, self.pool = self.pool, pool
        await old.close()

    def _take(self) -> list[DirtyKey]:
        """Up to `batch` dirty keys of one db, oldest first."""
        first_db = next(iter(self._dirty))[0]
        taken: list[DirtyKey] = []
        for dk in self._dirty:
            if dk[0] == first_db:
                taken.append(dk)
                if len(taken) >= self.batch:
                    break
        for dk in taken:
            del self._dirty[dk]
            self._in_flight.add(dk)
        return taken

    async def _worker(self, n: int) -> None:
        while True:
            if not self._dirty:
                self._work.clear()
                if not self._in_flight and not self._again:
                    self._idle.set()
                await self._work.wait()
                continue
            batch = self._take()
            waiters = [f for dk in batch for f in self._waiters.pop(dk, [])]
            try:
                result = await self._move(batch)
            except BaseException as exc:  # a copy that failed leaves its keys dirty
                for dk in batch:
                    self._in_flight.discard(dk)
                    self._dirty[dk] = None
                    self._waiters.setdefault(dk, []).extend(f for f in waiters if not f.done())
                if isinstance(exc, asyncio.CancelledError):
                    raise
                self.failure = exc
                self._idle.set()
                log.error("sync batch failed", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            self.failure = None
            self.stats.batches += 1
            self.stats.copied += result.copied
            self.stats.deleted += result.skipped
            self.stats.bytes += result.bytes
            for dk in batch:
                self._in_flight.discard(dk)
                if dk in self._again:
                    self._again.discard(dk)
                    self._dirty[dk] = None
            for f in waiters:
                if not f.done():
                    f.set_result(None)
            if self._dirty:
                self._work.set()
            elif not self._in_flight and not self._again:
                self._idle.set()

    async def _move(self, batch: list[DirtyKey]) -> MoveResult:
        db = batch[0][0]
        async with self.pool.mover() as mover:
            return await mover.move(db, [k for _, k in batch])

