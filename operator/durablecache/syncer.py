"""The syncer: the one owner of copying. Every key that must be copied — a live write marked by a
proxy, or a key found by the bulk copy or by a repair pass — goes through here.

Invariant kept (docs/design.md): a key stays dirty until a copy of it *started after its last mark* has
finished. A key marked while its copy is in flight is copied again afterwards, so two copies of
one key (or of one member, below) never race and a stale value can never land last.

Over 600 lines on purpose: the tables a key or member waits in (_dirty, _in_flight, _again, the bulk
copy's Held) and every path that moves it between them — mark, take, a copy's end or failure, the bulk
claim — keep one invariant together, and are read together.

The same one level down (docs/protocol.md, "Member-level marks"): a mark may name members of a key
(proxy/members.py); such a key waits with the set of its dirty members, and its copy copies just them.
A whole-key mark supersedes the members (the whole copy copies them too). Copies of disjoint members
of one key may be in flight together; a member marked while its copy is in flight waits for the next
one, and a whole copy of a key never overlaps any other copy of it (it waits in _again until they end).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import Iterable

from . import logs
from .bulkclaim import Held
from .errors import DurableCacheError
from .keymover import MoveResult
from .movers import MoverPool
from .proxy.members import MemberMark

log = logs.get("durablecache.syncer")
DirtyKey = tuple[int, bytes]  # (db, key)
# Slow keys: the syncer remembers how long the last copy of a big key took (KeyMover reports big
# keys only), so a cutover can hold writes to the keys it could not copy inside the write pause.
SLOW_KEY_SECONDS = 0.005  # copies faster than this are not worth remembering
SLOW_KEYS_KEPT = 1024     # bound on memory: the least recently copied slow keys are forgotten
POLL = 0.002
FAILURE_GRACE = 30.0  # a batch failing again and again for this long fails the waiters
BULK_BATCHES = 4      # see _take
STALL_LIMIT = 600.0  # no batch finished for this long while keys wait: something is stuck
# One member copy copies at most this many members of a key (one script call each side: it must stay
# short). A key with more dirty members is copied whole instead — cheaper for any key whose whole copy is
# fast — unless its whole copy is slow (a leaderboard of a million members): then its members go on
# being copied this many at a time, several copies at once.
MEMBERS_PER_KEY = 1024
# What waits for a key: None, the whole key; a set, just those members.
Pending = set[bytes] | None
_ABSENT: set[bytes] = set()   # dict.get default: "not there" (compared by identity, never filled)


@dataclasses.dataclass
class SyncStats:
    marks: int = 0
    copied: int = 0
    deleted: int = 0
    bytes: int = 0
    batches: int = 0
    overflowed: int = 0
    members: int = 0     # members copied one by one (member-level marks)
    slow_keys: int = 0  # keys whose last copy took at least SLOW_KEY_SECONDS (at most SLOW_KEYS_KEPT)


class _Waiter:
    """One copy_now call: done when each of its keys was copied (a key listed twice counts twice)."""

    __slots__ = ("left", "future")

    def __init__(self, left: int, future: asyncio.Future[None]):
        self.left = left
        self.future = future


class Syncer:
    def __init__(self, pool: MoverPool | None, *, workers: int = 4, batch: int = 500, max_dirty: int = 2_000_000):
        # None: no target yet (snapshot seeding, docs/aws.md): marks are recorded, bounded by max_dirty,
        # and copied once attach() gives the pool and start() the workers.
        self.pool = pool
        self._retired: list[MoverPool] = []   # replaced by switch_pool(), not closed yet
        self.workers = workers
        self.batch = batch
        self.max_dirty = max_dirty
        self.stats = SyncStats()
        # Keys waiting for a copy, in arrival order, with what of them: the whole key or some members.
        self._dirty: dict[DirtyKey, Pending] = {}
        # Being copied -> None: a whole copy; a set: the members in flight (of one or more batches).
        self._in_flight: dict[DirtyKey, Pending] = {}
        # Marked while in flight, copied once more afterwards: members whose copy is in flight (each waits
        # for its own copy to end), or the whole key (waits until no copy of the key is in flight).
        self._again: dict[DirtyKey, Pending] = {}
        # Keys the bulk copy's own batches are copying whole (copy_now), per db: in flight as well, but
        # no (db, key) entry per key (Held).
        self._bulk: dict[int, Held] = {}
        self._bulk_keys = 0  # how many, all dbs
        self._members = 0    # members waiting in _dirty and _again: they count toward max_dirty
        # Keys the bulk copy's SCAN ... TYPE string listed: read with GETRANGE instead of the DUMP script
        # (a hint only: keymover copies exactly whatever the key has become).
        self._strings: set[DirtyKey] = set()
        self._waiters: dict[DirtyKey, list[_Waiter]] = {}
        # Duration of the last copy of each slow key, least recently copied first (a dict keeps order),
        # and when such a key was last marked (is it being written now?).
        self._copy_time: dict[DirtyKey, float] = {}
        self._slow_marked: dict[DirtyKey, float] = {}
        self._work = asyncio.Event()
        self._batch_done = asyncio.Event()   # drain() looks again when a batch ends, not on a tick
        self._tasks: list[asyncio.Task[None]] = []
        self.failure: BaseException | None = None
        self._failing_since = 0.0
        self._last_progress = time.monotonic()
        # Why the next cutover must be preceded by a full verify-and-repair (None: not needed).
        self.repair_reason: str | None = None
        self.repair_wanted = asyncio.Event()   # set with repair_reason: wakes whoever waits for approval

    # -- marking ---------------------------------------------------------------------------------
    def mark(self, db: int, keys: Iterable[bytes], bulk: bool = False) -> None:
        """Record keys as dirty. Never blocks; past max_dirty a live mark records an overflow instead
        (bulk keys are bounded by copy_now's wait for room, and someone waits for them)."""
        if isinstance(keys, bytes | str):
            raise TypeError("mark() takes an iterable of keys, not one key")
        if not self.backlog:
            self._last_progress = time.monotonic()  # the stall clock starts when work arrives
        # Locals: this runs for every key a client writes and every key the bulk copy finds.
        dirty, in_flight, again, slow = self._dirty, self._in_flight, self._again, self._copy_time
        held = self._bulk.get(db) if self._bulk_keys else None
        limit = self.max_dirty if not bulk else 1 << 62
        marked = 0
        for key in keys:
            marked += 1
            if key.__class__ is not bytes and isinstance(key, MemberMark):
                self._mark_member(db, key, limit)
                continue
            dk = (db, key)
            if slow and dk in slow:
                self._slow_marked[dk] = time.monotonic()
            if dk in in_flight:
                table = again
                if dirty and dk in dirty:   # members waiting beside those in flight: the whole copy copies them
                    self._members -= len(dirty.pop(dk) or ())
            elif held is not None and key in held.keys:
                held.marked.add(key)     # copied again once its batch ends (_copy_claimed)
                table = again
            else:
                table = dirty
            waiting = table.get(dk, _ABSENT)
            if waiting is None:
                continue
            if waiting is _ABSENT:
                if table is dirty and len(dirty) + self._members >= limit:
                    self._overflow()
                    continue
            else:
                self._members -= len(waiting)   # the whole copy copies these members too
            table[dk] = None
        self.stats.marks += marked
        if self._dirty:
            self._work.set()

    def _mark_member(self, db: int, mark: MemberMark, limit: int) -> None:
        dk = (db, bytes(mark))
        member = mark.member
        held = self._bulk.get(db)
        flying = self._in_flight.get(dk, _ABSENT)
        if held is not None and dk[1] in held.keys:
            held.marked.add(dk[1])
            table = self._again          # a whole copy is in flight
        elif flying is _ABSENT:
            table = self._dirty
        elif flying is None or member in flying or self._again.get(dk, _ABSENT) is None:
            # Its own copy (or a whole one) is in flight, or a whole copy waits for the copies in flight
            # to end: the next copy of it starts after them.
            table = self._again
        else:
            table = self._dirty          # copied beside the other members in flight
        waiting = table.get(dk, _ABSENT)
        if waiting is None or member in waiting:
            return
        if waiting is _ABSENT:
            if table is self._dirty and len(self._dirty) + self._members >= limit:
                self._overflow()
                return
            table[dk] = {member}
            self._members += 1
        elif len(self._dirty) + self._members >= limit or (
                len(waiting) >= MEMBERS_PER_KEY and dk not in self._copy_time):   # (its whole copy is fast)
            self._queue(dk, None)   # copied whole instead: that frees its members' room, no mark is dropped
        else:
            waiting.add(member)
            self._members += 1

    def _queue(self, dk: DirtyKey, pending: Pending) -> None:
        """``pending`` (None: the whole key; a set: members not in flight, not counted yet) waits for a
        copy, merged with what waits for the key already. A whole copy supersedes waiting members and,
        while any copy of the key is in flight, waits in _again: it never overlaps another copy."""
        dirty, again = self._dirty, self._again
        if pending is None:
            for table in (dirty, again):
                gone = table.pop(dk, None)
                if gone:
                    self._members -= len(gone)
            (again if self.copying(dk) else dirty)[dk] = None
            return
        if again.get(dk, _ABSENT) is None:
            return                   # a whole copy waits for this key: it copies these members too
        waiting = dirty.get(dk, _ABSENT)
        if waiting is None:
            return
        if waiting is _ABSENT:
            dirty[dk] = pending
            self._members += len(pending)
        else:
            before = len(waiting)
            waiting |= pending
            self._members += len(waiting) - before

    def _overflow(self) -> None:
        self.stats.overflowed += 1
        self.require_repair(f"dirty-key backlog exceeded {self.max_dirty} keys and members")

    def on_marks(self, db: int, keys: list[bytes]) -> None:
        """The proxies' MarkCallback: delivered once it returns (synchronous: the in-process proxy
        then acknowledges the writes without a coroutine or a task in between)."""
        self.mark(db, keys)

    async def copy_now(self, db: int, keys: list[bytes], strings: frozenset[bytes] = frozenset()) -> MoveResult:
        """Bulk copy entry: return once each key was copied by a copy started after now. ``strings``
        (keys SCAN ... TYPE string listed) are a hint for the copy (keymover._read_string_template).

        Keys nobody copies or waits to copy — nearly all of a bulk copy's — are claimed as in flight
        a batch at a time (_claim, Held) and copied by the caller (_copy_claimed): the SCAN batch
        goes to a mover whole, without a dirty entry, a worker or a waiter per key, which cost the
        Copy phase more CPU per key than the copy itself. The invariant holds as for a worker's
        batch: a live mark of a held key lands in _again and the key is copied once more afterwards.
        The other keys (dirty, in flight already, or listed twice) are marked and waited for
        (_mark_and_wait)."""
        if not keys:
            return MoveResult()
        claimed, batch, busy = self._claim(db, keys)
        result = MoveResult()
        if claimed:
            copied = await self._copy_claimed(db, claimed, batch, strings)
            if copied is None:       # failed: its keys wait in _dirty now, retried by the workers
                busy += claimed
            else:
                result = copied
        if busy:
            result.add(await self._mark_and_wait(db, busy, strings))
        return result

    def _claim(self, db: int, keys: list[bytes]) -> tuple[list[bytes], set[bytes], list[bytes]]:
        """Claim as in flight the keys nobody copies or waits to copy: (those keys in SCAN order, the
        same as a set, the rest). A key listed twice is claimed once; its second listing waits for a
        copy after it."""
        if not self.backlog:
            self._last_progress = time.monotonic()  # the stall clock starts when work arrives
        held = self._bulk.get(db)
        if held is None:
            held = self._bulk[db] = Held()
        batch = set(keys)
        claimed: list[bytes] = keys
        busy: list[bytes] = []
        if len(batch) != len(keys) or not held.claim(batch) or self._workers_hold(db, held, batch, keys):
            claimed, busy = self._claim_each(db, keys, held)
            batch = set(claimed)
            if claimed:
                held.claim(batch)
        self._bulk_keys += len(batch)
        self.stats.marks += len(batch)
        return claimed, batch, busy

    def _workers_hold(self, db: int, held: Held, batch: set[bytes], keys: list[bytes]) -> bool:
        """Is any key of this batch (just claimed) dirty, or in a worker's copy? (_again's keys are all
        in flight.) If so the claim is undone. Looks through whichever is smaller: the workers' tables
        or the batch."""
        dirty, in_flight = self._dirty, self._in_flight
        if not dirty and not in_flight:
            return False
        if len(dirty) + len(in_flight) <= len(batch):
            found = any(d == db and k in batch for table in (dirty, in_flight) for d, k in table)
        else:
            pairs = list(zip(itertools.repeat(db), keys))
            found = not dirty.keys().isdisjoint(pairs) or not in_flight.keys().isdisjoint(pairs)
        if found:
            held.unclaim(batch)
        return found

    def _claim_each(self, db: int, keys: list[bytes], held: Held) -> tuple[list[bytes], list[bytes]]:
        """_claim's split, key by key: for a batch some of whose keys are taken (or listed twice)."""
        in_flight, dirty, taken = self._in_flight, self._dirty, held.keys
        claimed: list[bytes] = []
        seen: set[bytes] = set()
        busy: list[bytes] = []
        for key in keys:
            dk = (db, key)
            if key in seen or key in taken or dk in in_flight or dk in dirty:
                busy.append(key)
            else:
                seen.add(key)
                claimed.append(key)
        return claimed, busy

    async def _copy_claimed(self, db: int, claimed: list[bytes], batch: set[bytes],
                            strings: frozenset[bytes]) -> MoveResult | None:
        """Copy the keys _claim() put in flight; None when the copy failed (they are dirty again)."""
        assert self.pool is not None, "a bulk copy runs only once the syncer has its target"
        try:
            result = await self.pool.move(db, claimed, strings)
        except BaseException as exc:   # as a worker's batch: the keys wait again, for the workers' retry
            self._release(db, batch)
            for key in claimed:
                self._queue((db, key), None)
            self._work.set()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.error("bulk batch failed; the syncer retries it", error=str(exc))
            return None
        self._count(db, result)
        again, dirty = self._again, self._dirty
        for key in self._release(db, batch):   # marked meanwhile: dirty now, copied once more
            dk = (db, key)
            dirty[dk] = again.pop(dk, None)   # its members stay counted
        self._wake()
        return MoveResult(copied=len(claimed), bytes=result.bytes)

    def _release(self, db: int, batch: set[bytes]) -> set[bytes]:
        """A bulk batch's copy ended: its keys are no longer in flight. Returns those marked meanwhile."""
        self._bulk_keys -= len(batch)
        return self._bulk[db].release(batch)

    async def _mark_and_wait(self, db: int, keys: list[bytes], strings: frozenset[bytes]) -> MoveResult:
        """Mark keys and wait until each was copied by a worker's copy started after now. Waits for
        room first, so the bulk copy never crowds out live marks."""
        while len(self._dirty) + self._members + len(keys) > self.max_dirty // 2:
            self._raise_failure()
            await asyncio.sleep(0.01)
        waiter = _Waiter(len(keys), asyncio.get_running_loop().create_future())
        waiters = self._waiters
        for key in keys:
            dk = (db, key)
            listed = waiters.get(dk)
            if listed is None:
                waiters[dk] = [waiter]
            else:
                listed.append(waiter)
        if strings:
            self._strings.update((db, k) for k in keys if k in strings)
        self.mark(db, keys, bulk=True)
        while not waiter.future.done():
            self._raise_failure()
            await asyncio.wait([waiter.future], timeout=1.0)
        # Keys of one call may share batches with live marks: bytes are only counted in self.stats.
        return MoveResult(copied=len(keys))

    def require_repair(self, reason: str, *, planned: bool = False) -> None:
        """A full verify-and-repair must run before any cutover. ``planned``: a pass the protocol always
        makes (after the copy), not a fault, so it is not logged as a warning."""
        if self.repair_reason is None:
            if planned:
                log.info("verify-and-repair pass", reason=reason)
            else:
                log.warning("full verify-and-repair required before cutover", reason=reason)
            self.repair_reason = reason
            self.repair_wanted.set()

    # -- state -----------------------------------------------------------------------------------
    @property
    def backlog(self) -> int:
        return len(self._dirty) + len(self._in_flight) + self._bulk_keys + len(self._again)

    def empty(self) -> bool:
        return self.backlog == 0

    def pending(self, dk: DirtyKey) -> bool:
        """Is this key dirty, in flight, or to be copied again?"""
        return dk in self._dirty or self.copying(dk) or dk in self._again

    def copying(self, dk: DirtyKey) -> bool:
        """Is this key in flight: in a worker's copy, or in a bulk batch's?"""
        return dk in self._in_flight or self._bulk_holds(dk)

    def _bulk_holds(self, dk: DirtyKey) -> bool:
        """Is this key in a bulk batch's copy (copy_now): in flight, and always whole?"""
        held = self._bulk.get(dk[0])
        return held is not None and dk[1] in held.keys

    @property
    def dirty_members(self) -> int:
        """Members waiting to be copied one by one (they count toward max_dirty with the keys)."""
        return self._members

    def _whole_pending(self, dk: DirtyKey) -> bool:
        """Does a whole copy of this key wait or run (not just members of it)?"""
        return (self._dirty.get(dk, _ABSENT) is None or self._again.get(dk, _ABSENT) is None
                or self._in_flight.get(dk, _ABSENT) is None or self._bulk_holds(dk))

    def expected_copy(self, dk: DirtyKey) -> float:
        """Seconds the last copy of this key took (0.0 when it was fast or never timed)."""
        return self._copy_time.get(dk, 0.0)

    def slow_keys(self, threshold: float, recent: float = 1.0) -> set[DirtyKey]:
        """Keys whose whole copy takes longer than ``threshold`` and that a drain may have to copy
        whole: waiting for (or in) a whole copy now, or marked whole within the last ``recent`` seconds
        (a hot key between two copies). A key written member by member is not among them: copying
        its members takes no longer than copying a small key."""
        since = time.monotonic() - recent
        return {dk for dk, secs in self._copy_time.items()
                if secs > threshold and (self._whole_pending(dk) or self._slow_marked.get(dk, 0.0) >= since)}

    def _record(self, db: int, timings: list[tuple[bytes, float]]) -> None:
        for key, secs in timings:
            dk = (db, key)
            self._copy_time.pop(dk, None)
            if secs < SLOW_KEY_SECONDS:
                self._slow_marked.pop(dk, None)
                continue
            self._copy_time[dk] = secs
            while len(self._copy_time) > SLOW_KEYS_KEPT:
                oldest = next(iter(self._copy_time))
                del self._copy_time[oldest]
                self._slow_marked.pop(oldest, None)
        self.stats.slow_keys = len(self._copy_time)

    async def wait_copied(self, keys: Iterable[DirtyKey], timeout: float) -> bool:
        """Wait until none of ``keys`` is dirty, in flight or to be copied again; False on timeout.
        With writes to them held (Proxy.hold_keys) this means: copied after their last write."""
        todo = set(keys)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._raise_failure()
                    todo = {dk for dk in todo if self.pending(dk)}
                    if not todo:
                        return True
                    await asyncio.sleep(POLL)
        except TimeoutError:
            return False

    async def settle(self, at_most: int, timeout: float) -> bool:
        """Wait until the backlog is at most ``at_most`` keys; False on timeout. Unlike drain(), this
        ends while a hot key is being written continuously (it is never clean for long)."""
        try:
            async with asyncio.timeout(timeout):
                while self.backlog > at_most:
                    self._raise_failure()
                    await asyncio.sleep(POLL * 5)
        except TimeoutError:
            return False
        self._raise_failure()
        return True

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is dirty or in flight; False if that took longer than timeout."""
        return await self.shrink_to(0, timeout)

    async def shrink_to(self, backlog: int, timeout: float) -> bool:
        """Wait until at most ``backlog`` keys wait (dirty or in flight); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.backlog > backlog:
            self._raise_failure()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._batch_done.clear()
            # Woken as a batch ends (inside a cutover's pause every tick counts); the tick stays as a
            # bound: a failing batch retries on its own timer.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._batch_done.wait(), min(POLL, left))
        return True

    def _raise_failure(self) -> None:
        """A failing batch is retried; only a failure that persists, or a syncer that stopped making
        progress, ends the wait of whoever depends on it."""
        now = time.monotonic()
        if self.failure is not None and now - self._failing_since > FAILURE_GRACE:
            raise self.failure
        if self.backlog and now - self._last_progress > STALL_LIMIT:
            raise DurableCacheError(f"the syncer made no progress for {STALL_LIMIT:.0f}s "
                                    f"(backlog {self.backlog} keys)")

    # -- workers ---------------------------------------------------------------------------------
    def attach(self, pool: MoverPool) -> None:
        """The pool of a target that did not exist when the syncer began to collect marks."""
        if self.pool is not None:
            raise RuntimeError("the syncer has its pool already")
        self.pool = pool

    def start(self) -> None:
        if self.pool is None:
            raise RuntimeError("the syncer cannot copy before it has a target (attach)")
        self._last_progress = time.monotonic()   # marks may have waited for the target: not a stall
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    def switch_pool(self, pool: MoverPool) -> None:
        """Copy the other way from now on. Called between DRAIN and FLIP, while writes are frozen: a
        mark that still arrives then (a write whose client vanished before its reply) must be copied
        from the side that is about to become authoritative, never onto it. The old pool's connections
        are closed by close_pools(), once writes flow again: closing them need not hold writes."""
        if self.pool is not None:
            self._retired.append(self.pool)
        self.pool = pool

    async def close_pools(self, *, current: bool = False) -> None:
        """Close the pools switch_pool() replaced (and, with ``current``, the one in use)."""
        if current and self.pool is not None:
            self._retired.append(self.pool)
        while self._retired:
            await self._retired.pop().close()

    def _take(self) -> list[tuple[DirtyKey, Pending]]:
        """Up to `batch` dirty keys of one db, oldest first; BULK_BATCHES times as many while the backlog
        is large (the bulk copy): fewer round trips per key, and no drain waits behind such a batch,
        since a cutover starts only once the backlog is small."""
        dirty = self._dirty
        first_db = next(iter(dirty))[0]
        size = self.batch * BULK_BATCHES if len(dirty) > self.batch * BULK_BATCHES * self.workers else self.batch
        taken: list[tuple[DirtyKey, Pending]] = []
        for dk, waiting in dirty.items():
            if dk[0] == first_db:
                taken.append((dk, waiting))
                if len(taken) >= size:
                    break
        in_flight = self._in_flight
        for i, (dk, waiting) in enumerate(taken):
            del dirty[dk]
            if waiting is not None and len(waiting) > MEMBERS_PER_KEY:
                # A slow key's (see _mark_member): the rest waits at the back, behind other keys and dbs.
                part = set(itertools.islice(waiting, MEMBERS_PER_KEY))
                waiting -= part
                dirty[dk] = waiting
                waiting, taken[i] = part, (dk, part)
            if waiting is None:
                in_flight[dk] = None
                continue
            self._members -= len(waiting)
            flying = in_flight.get(dk, _ABSENT)
            if flying is _ABSENT:
                in_flight[dk] = set(waiting)
            else:
                assert flying is not None, "members are never taken while a whole copy of the key runs"
                flying |= waiting
        return taken

    async def _worker(self, n: int) -> None:
        while True:
            if not self._dirty:
                self._work.clear()
                await self._work.wait()
                continue
            batch = self._take()
            waiters = {dk: self._waiters.pop(dk, []) for dk, _ in batch}
            try:
                result = await self._move(batch)
            except BaseException as exc:  # a copy that failed leaves its keys dirty, with their waiters
                for dk, waiting in batch:
                    self._ended(dk, waiting)
                    self._queue(dk, waiting)   # (the batch's own set: nothing else holds it)
                    if waiters[dk]:
                        self._waiters.setdefault(dk, []).extend(waiters[dk])
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if self.failure is None:
                    self._failing_since = time.monotonic()
                self.failure = exc
                log.error("sync batch failed; retrying", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            self._finished(batch, result)
            for listed in waiters.values():
                for w in listed:
                    w.left -= 1
                    if w.left <= 0 and not w.future.done():
                        w.future.set_result(None)

    def _finished(self, batch: list[tuple[DirtyKey, Pending]], result: MoveResult) -> None:
        """A worker's batch of in-flight keys was copied: they are clean unless marked meanwhile (then
        dirty); keys whose members could not be patched wait for a whole copy."""
        db = batch[0][0][0]
        self._count(db, result)
        in_flight, again = self._in_flight, self._again
        for dk, waiting in batch:
            if waiting is None and not again:
                del in_flight[dk]    # the common case, kept cheap: a whole copy, nothing marked meanwhile
            else:
                self._ended(dk, waiting)
        for key in result.unpatched:
            self._queue((db, key), None)
        self._wake()

    def _ended(self, dk: DirtyKey, waiting: Pending) -> None:
        """A copy of ``waiting`` (None: the whole key) of this key ended: it is no longer in flight, and
        what was marked while it was waits for the next copy — a member as soon as its own copy ended,
        the whole key once no copy of it is in flight."""
        in_flight, again = self._in_flight, self._again
        if waiting is None:
            del in_flight[dk]
        else:
            flying = in_flight[dk]
            assert flying is not None, "a whole copy never overlaps a copy of members"
            flying -= waiting
            if not flying:
                del in_flight[dk]
        marked = again.get(dk, _ABSENT)
        if marked is _ABSENT:
            return
        if dk not in in_flight:
            del again[dk]
        elif marked is None or waiting is None:
            return                   # waits for the other copies of the key to end
        else:
            mine = marked & waiting
            if not mine:
                return
            marked -= mine
            if not marked:
                del again[dk]
            marked = mine
        if marked is not None:
            self._members -= len(marked)
        self._queue(dk, marked)

    def _count(self, db: int, result: MoveResult) -> None:
        """A batch was copied: the syncer made progress."""
        self.failure = None
        self._last_progress = time.monotonic()
        self.stats.batches += 1
        self.stats.copied += result.copied
        self.stats.deleted += result.skipped
        self.stats.bytes += result.bytes
        self.stats.members += result.members
        if result.timings:
            self._record(db, result.timings)

    def _wake(self) -> None:
        """After a batch: the workers, if keys wait, and whoever waits for the backlog to shrink."""
        if self._dirty:
            self._work.set()
        self._batch_done.set()

    async def _move(self, batch: list[tuple[DirtyKey, Pending]]) -> MoveResult:
        db = batch[0][0][0]
        whole = [dk[1] for dk, waiting in batch if waiting is None]
        parts = {dk[1]: list(waiting) for dk, waiting in batch if waiting is not None}
        pool = self.pool
        assert pool is not None, "start() refuses to run without a pool"
        result = MoveResult()
        if whole:
            hinted = self._strings
            strings = frozenset([k for k in whole if (db, k) in hinted]) if hinted else frozenset()
            if strings:
                hinted.difference_update((db, k) for k in strings)
            result = await pool.move(db, whole, strings)
        if parts:
            result.add(await pool.move_members(db, parts))
        return result

