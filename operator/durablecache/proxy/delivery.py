"""Handing the keys of answered writes to ``on_marks`` before their replies go out (docs/proxy.md,
"Marks"): at once where that settles them, otherwise batched into rounds that complete later and
then let the session write the replies (its ``marks_done``)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final

from .. import logs
from .marks import MarkCallback, RemoteMarks

log = logs.get("durablecache.proxy")

EAGER_RETRY: Final = 1000       # after on_marks suspended, queue this many submissions before trying "now" again
# Remote marks not acknowledged yet, in frame bytes, below which writes are answered without waiting
# for the syncer's ack: bounds the proxy's memory (and the marks a crash could lose) in a syncer outage.
MARK_STREAM_BYTES: Final = 8 << 20
# A session's way to learn that a batch it submitted is settled: (delivered, writes, its held replies).
MarksDone = Callable[[bool, int, list[bytes]], None]


def is_async(fn: Any) -> bool:
    """Is ``fn`` (a function, a bound method or an object with ``__call__``) a coroutine function?"""
    if inspect.iscoroutinefunction(fn):
        return True
    return not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)


class _Resume:
    """Awaitable that finishes a coroutine already advanced by hand to its first suspension: the
    future it yielded is passed on to the awaiting task, and what the task sends or throws back is
    passed into the coroutine, exactly as if the task had started it."""

    def __init__(self, coro: Coroutine[Any, Any, bool], first: Any):
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, bool]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # noqa: BLE001 — cancellation and the like go into the coroutine
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return bool(stop.value)
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return bool(stop.value)



class MarkDelivery:
    """Delivers the marks of every session of a proxy to its ``on_marks``, and counts them."""

    def __init__(self, on_marks: MarkCallback):
        self.down = False               # the remote stream is down: sessions refuse writes (fail closed)
        self.remote: RemoteMarks | None = None
        self.on_marks = on_marks        # sets remote and down
        self.mark_stream_bytes = MARK_STREAM_BYTES
        self._mark_queue: list[tuple[MarksDone, dict[int, list[bytes]], int, list[bytes]]] = []
        self._delivering = False
        self._eager_skip = 0
        self._rounds: set[asyncio.Task[None]] = set()
        self.marks = 0
        self.mark_batches = 0
        self.marks_failed = 0
        self.marks_throttled = 0        # batches whose replies waited for the syncer's ack (backlog full)

    @property
    def on_marks(self) -> MarkCallback:
        return self._on_marks

    @on_marks.setter
    def on_marks(self, on_marks: MarkCallback) -> None:
        self._on_marks = on_marks
        self._marks_sync = not is_async(on_marks)
        # RemoteMarks takes each batch through submit(): streamed, or calling back on its ack.
        if self.remote is not None and self.remote is not on_marks:
            self.remote.on_state = None     # its stream no longer decides anything here (end_migration)
        self.remote = on_marks if isinstance(on_marks, RemoteMarks) else None
        if self.remote is not None:
            self.remote.on_state = self._remote_state
            self.down = not self.remote.connected
        else:
            self.down = False

    def _remote_state(self, up: bool) -> None:
        if self.down != (not up):
            log.warning("proxy.coordinator_reachable" if up else "proxy.coordinator_lost",
                        refusing_writes=not up)
        self.down = not up

    # ---- life cycle -------------------------------------------------------------------------------

    def marks_now(self, batch: dict[int, list[bytes]], writes: int) -> bool | None:
        """Hand marks over without waiting, where that settles them: True once a synchronous
        ``on_marks`` took them or RemoteMarks streams them, False if that failed; None when they
        need a delivery that completes later (``submit_marks``).

        RemoteMarks streams while its unacknowledged backlog is below ``mark_stream_bytes`` (freeze
        and hold_keys wait for that backlog: docs/proxy.md, "Marks"); past it, the replies wait for
        the syncer's ack, which slows the writers down to the syncer's pace."""
        if self._marks_sync:
            return self._deliver_now(batch, writes)
        remote = self.remote
        # Streamed only while connected and acknowledged lately: a write answered now whose marks then
        # wait on a dead stream could be lost with the proxy (fail closed, docs/ha.md). Otherwise the
        # reply waits for the ack.
        if (remote is not None and remote.backlog_bytes < self.mark_stream_bytes
                and remote.streaming(time.monotonic())):
            for keys in batch.values():
                self.marks += len(keys)
            self.mark_batches += 1
            remote.submit(batch)
            return True
        return None

    def submit_marks(self, done: MarksDone, batch: dict[int, list[bytes]], writes: int,
                     out: list[bytes]) -> None:
        """Deliver marks that ``marks_now`` could not settle, then let the session write the replies
        (``done``: the session's ``marks_done``).

        RemoteMarks with a full backlog calls back on the syncer's ack. A coroutine function is
        driven by hand first, and when it completes without suspending the replies go out in this
        very callback — no task, no extra loop iteration. If it suspends, the started delivery is
        finished in a task, and the next ``EAGER_RETRY`` submissions are queued instead: everything
        queued in one loop iteration is delivered as one round (one ``on_marks`` call per db); rounds
        do not wait for each other, so a slow syncer does not serialise the sessions."""
        remote = self.remote
        if remote is not None:
            keys = 0
            for ks in batch.values():
                keys += len(ks)
            self.marks_throttled += 1
            remote.submit(batch, functools.partial(self._acked, done, writes, out, keys))
            return
        if not self._eager_skip:
            coro = self.deliver(batch, writes)
            try:
                first = coro.send(None)
            except StopIteration as stop:
                done(stop.value, writes, out)
                return
            self._eager_skip = EAGER_RETRY
            task = asyncio.get_running_loop().create_task(self._finish_eager(coro, first, done, writes, out))
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)
            return
        self._eager_skip -= 1
        self._mark_queue.append((done, batch, writes, out))
        if not self._delivering:
            self._delivering = True
            asyncio.get_running_loop().call_soon(self._start_round)

    def _start_round(self) -> None:
        self._delivering = False
        queue, self._mark_queue = self._mark_queue, []
        if queue:
            task = asyncio.get_running_loop().create_task(self._deliver_round(queue))
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)

    async def _finish_eager(self, coro: Coroutine[Any, Any, bool], first: Any, done: MarksDone, writes: int,
                            out: list[bytes]) -> None:
        ok = await _Resume(coro, first)
        done(ok, writes, out)

    async def _deliver_round(self, queue: list[tuple[MarksDone, dict[int, list[bytes]], int, list[bytes]]]) -> None:
        if len(queue) == 1:
            merged = queue[0][1]
        else:
            merged = {}
            for _, batch, _, _ in queue:
                for db, keys in batch.items():
                    if db in merged:
                        merged[db].extend(keys)
                    else:
                        merged[db] = list(keys)
        ok = await self.deliver(merged, sum(q[2] for q in queue))
        for done, _, writes, out in queue:
            done(ok, writes, out)

    async def deliver(self, batch: dict[int, list[bytes]], writes: int) -> bool:
        """Hand the keys of completed writes to ``on_marks``; False if that failed (never drop quietly)."""
        try:
            for db, keys in batch.items():
                await self._on_marks(db, keys)   # type: ignore[misc]  # async: checked when it was set
                self.marks += len(keys)
            self.mark_batches += 1
            return True
        except Exception as exc:  # noqa: BLE001 — any failure means the marks are not delivered
            return self._marks_failed(exc, writes)

    def _acked(self, done: MarksDone, writes: int, out: list[bytes], keys: int, failed: BaseException | None) -> None:
        if failed is None:
            self.marks += keys
            self.mark_batches += 1
        else:
            self._marks_failed(failed, writes)
        done(failed is None, writes, out)

    def _deliver_now(self, batch: dict[int, list[bytes]], writes: int) -> bool:
        """``deliver`` for a synchronous ``on_marks``."""
        try:
            for db, keys in batch.items():
                if self._on_marks(db, keys) is not None:
                    raise TypeError("a synchronous on_marks must return None (or be a coroutine function)")
                self.marks += len(keys)
            self.mark_batches += 1
            return True
        except Exception as exc:  # noqa: BLE001 — any failure means the marks are not delivered
            return self._marks_failed(exc, writes)

    def _marks_failed(self, exc: BaseException, writes: int) -> bool:
        self.marks_failed += 1
        log.error("proxy.marks_failed", reason=str(exc) or type(exc).__name__, writes=writes)
        return False

