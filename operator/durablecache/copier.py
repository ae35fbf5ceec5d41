"""The bulk copy: SCAN every source shard (and every db of a standalone source) and hand the keys, a
batch at a time, to a KeyMover — directly for ``durablecache copy``, or through the syncer during a
migration so that live writes and the bulk copy never race on one key.

Progress is checkpointed per source shard as the SCAN cursor *after which every key was copied*:
batches run concurrently, but the cursor only advances past a batch once it and all batches before
it are done. A killed copy resumes from there; re-copying a few keys is harmless (RESTORE REPLACE).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .checkpoint import CheckpointStore, MemoryCheckpoint
from .errors import RefusedError, ServerError, UsageError
from .keymover import MoveResult
from .progress import NoProgress, Progress
from .resp import Connection, ReplyError
from .topology import Topology, keyspace_counts, parse_info

# (db, keys, the keys among them that SCAN ... TYPE string listed: a hint, see keymover._read_string_template)
Submit = Callable[[int, list[bytes], frozenset[bytes]], Awaitable[MoveResult]]
CHECKPOINT_VERSION = 1
SAVE_INTERVAL = 1.0


@dataclasses.dataclass(frozen=True)
class Unit:
    """One SCAN cursor space: a cluster primary, or one db of a standalone server."""

    primary: int
    db: int
    address: str

    @property
    def id(self) -> str:
        return f"{self.address}/db{self.db}"


@dataclasses.dataclass
class UnitState:
    cursor: int = 0
    done: bool = False
    keys: int = 0
    bytes: int = 0
    skipped: int = 0
    big: int = 0


@dataclasses.dataclass
class CopySummary:
    keys: int
    bytes: int
    skipped: int
    big: int
    seconds: float
    resumed: bool

    def as_dict(self) -> dict[str, Any]:
        return {"event": "summary", **dataclasses.asdict(self), "seconds": round(self.seconds, 3)}


async def unit_sizes(topo: Topology) -> dict[Unit, int]:
    """Every unit of the source with its key count (for ETA and for the empty-target check)."""
    if not topo.cluster:
        address = topo.primaries[0].address
        return {Unit(0, db, address): n for db, n in sorted(topo.db_keys.items())}
    sizes = {}
    for i, node in enumerate(topo.primaries):
        conn = await Connection.open(node, name="durablecache-copy", select_db=0)
        try:
            # Valkey 9 clusters may have numbered databases (cluster-databases): one unit per db in use.
            counts = keyspace_counts(parse_info(await conn.call("INFO", "keyspace")))
            for db in sorted(set(counts) | {0}):
                sizes[Unit(i, db, node.address)] = counts.get(db, 0)
        finally:
            await conn.close()
    return sizes


async def refresh_db_keys(topo: Topology) -> None:
    if not topo.cluster:
        conn = await Connection.open(topo.seed, name="durablecache-copy", select_db=0)
        try:
            topo.db_keys = keyspace_counts(parse_info(await conn.call("INFO", "keyspace")))
        finally:
            await conn.close()


def refuse_same_server(source: Topology, target: Topology, command: str) -> None:
    """Source and target must be different servers (compared by run_id, whatever address names them):
    a copy onto itself corrupts, a verify of a server against itself proves nothing."""
    if source.run_ids & target.run_ids:
        why = "comparing a server with itself proves nothing" if command == "verify" else \
            f"refusing to {command} onto itself"
        raise RefusedError(f"source and target are the same server ({target.seed.address}); {why}")


async def check_pair(source: Topology, target: Topology, allow_nonempty: bool,
                     nonempty_hint: str = "pass --allow-nonempty to copy over existing data") -> None:
    """Refuse, before anything is written, what would corrupt or lose data."""
    refuse_same_server(source, target, "copy")
    await refresh_db_keys(source)
    if target.cluster and not source.cluster:
        used = sorted(db for db, n in source.db_keys.items() if n and db != 0)
        if used and not await _cluster_has_databases(target, max(used)):
            raise RefusedError(f"source has keys in database(s) {used}, but the target is a cluster without "
                               f"database {max(used)}: a Valkey >= 9 cluster needs cluster-databases >= "
                               f"{max(used) + 1} (a cluster has only db 0 otherwise)")
    if source.volatile_item_keys and not target.field_ttl:
        examples = await keys_with_field_expiry(source)
        raise RefusedError(
            f"source has {source.volatile_item_keys} hash key(s) whose fields carry their own expiry (e.g. "
            f"{', '.join(repr(k.decode(errors='replace')) for k in examples) or '?'}), which a target without "
            f"hash field expiration cannot hold (target {target.describe()}; Valkey >= 9 can)")
    if not allow_nonempty:
        await refresh_db_keys(target)
        present = sum((await unit_sizes(target)).values())
        if present:
            raise RefusedError(f"target {target.seed.address} is not empty ({present} keys); {nonempty_hint}")


async def _cluster_has_databases(topo: Topology, highest: int) -> bool:
    """Can every primary of this cluster SELECT ``highest``? (Valkey 9's cluster-databases; CONFIG is
    not available on ElastiCache, so ask by trying.)"""
    for node in topo.primaries:
        conn = await Connection.open(node, name="durablecache-preflight", select_db=0)
        try:
            if isinstance((await conn.pipeline([("SELECT", highest)]))[0], ReplyError):
                return False
        finally:
            await conn.close()
    return True


async def keys_with_field_expiry(topo: Topology, want: int = 5, scan_limit: int = 200_000) -> list[bytes]:
    """A few hash keys whose fields carry their own expiry, found by scanning at most ``scan_limit`` keys
    of db 0 on each primary (to name them in an error)."""
    found: list[bytes] = []
    for node in topo.primaries:
        conn = await Connection.open(node, name="durablecache-preflight", select_db=0)
        try:
            cursor, seen = b"0", 0
            while len(found) < want and seen < scan_limit:
                cursor, keys = await conn.call("SCAN", cursor, "COUNT", 1000, "TYPE", "hash")
                seen += 1000
                # The first chunk of each hash's fields only: enough to name examples, never a huge read.
                replies = await conn.pipeline([("HSCAN", k, 0, "COUNT", 1000) for k in keys])
                checks = [(k, list(v[1][::2])) for k, v in zip(keys, replies) if isinstance(v, list) and v[1]]
                ttls = await conn.pipeline([("HPEXPIRETIME", k, "FIELDS", len(fs), *fs) for k, fs in checks])
                found += [k for (k, _), t in zip(checks, ttls) if isinstance(t, list) and any(x > 0 for x in t)]
                if cursor in (b"0", 0):
                    break
        finally:
            await conn.close()
        if len(found) >= want:
            break
    return found[:want]


class BulkCopy:
    def __init__(self, source: Topology, target: Topology, submit: Submit, *,
                 store: CheckpointStore | None = None, progress: Progress | None = None,
                 scan_count: int = 2000, concurrency: int = 8):
        self.source = source
        self.target = target
        self.submit = submit
        self.store = store or MemoryCheckpoint()
        self.progress = progress or NoProgress()
        self.scan_count = scan_count
        self.concurrency = concurrency
        self.units: dict[str, UnitState] = {}
        self._last_save = 0.0

    def fingerprint(self) -> dict[str, str]:
        return {"source": self.source.seed.address, "target": self.target.seed.address}

    def load(self) -> bool:
        """Read the checkpoint; True when resuming a copy that made progress."""
        saved = self.store.load()
        if not saved:
            return False
        if saved.get("version") != CHECKPOINT_VERSION or saved.get("pair") != self.fingerprint():
            raise UsageError(
                f"the checkpoint belongs to another copy ({saved.get('pair')}); remove it or use another state file")
        self.units = {uid: UnitState(**u) for uid, u in saved.get("units", {}).items()}
        return any(u.keys or u.cursor or u.done for u in self.units.values())

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_save >= SAVE_INTERVAL:
            self._last_save = now
            self.store.save({"version": CHECKPOINT_VERSION, "pair": self.fingerprint(),
                             "units": {uid: dataclasses.asdict(u) for uid, u in self.units.items()}})

    def totals(self) -> UnitState:
        t = UnitState()
        for u in self.units.values():
            t.keys += u.keys
            t.bytes += u.bytes
            t.skipped += u.skipped
            t.big += u.big
        return t

    async def run(self) -> CopySummary:
        t0 = time.monotonic()
        resumed = self.load()
        await refresh_db_keys(self.source)
        sizes = await unit_sizes(self.source)
        for unit in sizes:
            self.units.setdefault(unit.id, UnitState())
        done_before = self.totals()
        self.progress.start(sum(sizes.values()))
        if done_before.keys:
            self.progress.advance(done_before.keys, done_before.bytes)
        try:
            await asyncio.gather(*(self._copy_unit(u) for u in sizes if not self.units[u.id].done))
        finally:
            self.save(force=True)
            self.progress.finish()
        t = self.totals()
        return CopySummary(t.keys, t.bytes, t.skipped, t.big, time.monotonic() - t0, resumed)

    async def _scan(self, conn: Connection, cursor: int) -> tuple[int, list[bytes], frozenset[bytes]]:
        """One SCAN step: (next cursor, keys, which of them are strings). The same step repeated with
        TYPE string costs the source a fraction of what it saves: strings are then copied as plain
        values. Both SCANs walk the same buckets unless the table rehashes in between; the string set
        is only a hint either way."""
        scan = ("SCAN", cursor, "COUNT", self.scan_count)
        if not self.source.supports_pexpiretime:  # Redis < 7: no string fast path (see KeyMover)
            cursor_raw, keys = await conn.call(*scan)
            return int(cursor_raw), list(keys), frozenset()
        replies = await conn.pipeline([scan, (*scan, "TYPE", "string")])
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise ServerError(f"{conn.endpoint.address}: SCAN failed: {reply}")
        (cursor_raw, keys), (_, strings) = replies
        return int(cursor_raw), list(keys), frozenset(strings)

    async def _copy_unit(self, unit: Unit) -> None:
        state = self.units[unit.id]
        conn = await Connection.open(self.source.primaries[unit.primary], name="durablecache-scan", select_db=unit.db)
        window = asyncio.Semaphore(self.concurrency)
        finished: dict[int, tuple[int, MoveResult]] = {}
        next_commit = 0
        tasks: set[asyncio.Task[None]] = set()
        failures: list[BaseException] = []

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())  # type: ignore[arg-type]

        def commit() -> None:
            nonlocal next_commit
            while next_commit in finished:
                cursor_after, res = finished.pop(next_commit)
                next_commit += 1
                state.cursor = cursor_after
                state.keys += res.copied
                state.bytes += res.bytes
                state.skipped += res.skipped
                state.big += res.big
                state.done = cursor_after == 0
            self.save()

        async def batch(seq: int, keys: list[bytes], strings: frozenset[bytes], cursor_after: int) -> None:
            try:
                res = await self.submit(unit.db, keys, strings) if keys else MoveResult()
                finished[seq] = (cursor_after, res)
                self.progress.advance(res.copied, res.bytes)
                commit()
            finally:
                window.release()

        try:
            cursor = state.cursor
            for seq in range(1 << 40):  # SCAN terminates when the cursor returns to 0
                cursor, keys, strings = await self._scan(conn, cursor)  # the next batch is ready
                await window.acquire()  # as soon as one finishes
                task = asyncio.create_task(batch(seq, keys, strings, cursor))
                tasks.add(task)
                task.add_done_callback(done)
                if failures or cursor == 0:  # a failed batch stops the scan: its keys were not copied
                    break
            await asyncio.gather(*tasks, return_exceptions=True)
            if failures:
                raise failures[0]
        finally:
            for t in tasks:
                t.cancel()
            await conn.close()
