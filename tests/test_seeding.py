"""Snapshot seeding in the engine (docs/aws.md, "Snapshot seeding"): the migration starts with the source
alone, RouteIn passes, then the target is restored from a snapshot taken after that point, and instead of
the bulk copy the syncer copies every key marked since RouteIn — including the writes made between the
snapshot and the restore, which only the marks can bring across.

No AWS here: seedstandin.py is the test's STAND-IN FOR ELASTICACHE'S CreateSnapshot and restore
(CreateReplicationGroup with SnapshotName): it saves the source's RDB (SAVE: a point-in-time snapshot, as
ElastiCache's is) and restarts the target server from that file — the data a restored cluster holds.
The planned verify pass is off (verify_in_sync=False) in the catch-up test, so nothing but the syncer's
marks can make the target equal."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import valkey

from durablecache.migration import Migration, MigrationOptions, SeededTarget
from durablecache.proxyhandles import local_proxies
from durablecache.syncer import Syncer
from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.workload import Workload, seed
from durablecache.topology import discover
from durablecache.urls import Endpoint
from durablecache.verify import Verifier
from seedstandin import restore, snapshot  # tests/ is on sys.path (rootdir insertion)

SEEDED_KEYS = 2000
WINDOW_KEYS = 300       # written after the snapshot, before the restore
MIGRATION_TIMEOUT = 120.0


@dataclasses.dataclass
class Window:
    """The writes between the snapshot and the restore, made through the proxy (so marked)."""

    added: dict[str, str] = dataclasses.field(default_factory=dict)
    changed: dict[str, str] = dataclasses.field(default_factory=dict)
    deleted: list[str] = dataclasses.field(default_factory=list)

    def write(self, proxy: str) -> None:
        host, port = proxy.rsplit(":", 1)
        with contextlib.closing(valkey.Valkey(host=host, port=int(port), socket_timeout=10)) as c:
            for i in range(WINDOW_KEYS):
                key, value = f"window:{i}", f"after-snapshot-{i}"
                assert c.set(key, value)
                self.added[key] = value
            seeded = sorted(k.decode() for k in c.scan_iter(match="seed:*", count=500))[:100]
            for key in seeded[:50]:
                assert c.set(key, "changed-after-snapshot")
                self.changed[key] = "changed-after-snapshot"
            for key in seeded[50:]:
                assert c.delete(key) == 1
                self.deleted.append(key)


def seeder(source: LocalServer, target: LocalServer, window: Window, proxies: list[str],
           restored: dict[str, int]) -> Callable[[], Awaitable[SeededTarget]]:
    async def seed_target() -> SeededTarget:
        rdb = await asyncio.to_thread(snapshot, source)
        await asyncio.to_thread(window.write, proxies[0])
        await asyncio.to_thread(restore, rdb, target)
        with contextlib.closing(target.client()) as c:
            # The restore holds the snapshot, not what was written after it.
            restored["keys"] = c.dbsize()
            assert c.get("window:0") is None
        return SeededTarget(target.endpoint())
    return seed_target


async def seeded_migration(source: LocalServer, target: LocalServer, opts: MigrationOptions) -> dict[str, Any]:
    with contextlib.closing(source.client()) as c:
        seed(c, SEEDED_KEYS)
    load = Workload("127.0.0.1", source.port, writers=2, rate=200)
    load.start()
    events: list[dict[str, Any]] = []
    proxies: list[str] = []
    cut = asyncio.Event()
    window, restored = Window(), {}

    def emit(e: dict[str, Any]) -> None:
        events.append(e)
        if e["event"] == "proxies":
            proxies.extend(e["addresses"])
            host, port = e["addresses"][0].rsplit(":", 1)
            load.point_at(host, int(port))
        if e["event"] == "cutover":
            cut.set()

    m = Migration(source.endpoint(), None, opts, local_proxies("127.0.0.1", 0), emit=emit,
                  seed_target=seeder(source, target, window, proxies, restored))
    task = asyncio.create_task(m.run())
    try:
        await asyncio.wait([task, asyncio.create_task(cut.wait())], timeout=MIGRATION_TIMEOUT,
                           return_when=asyncio.FIRST_COMPLETED)
        assert cut.is_set(), (task.exception() if task.done() else "no cutover", events[-6:])
        await load.finish()
        with contextlib.closing(target.client()) as c:
            lost = load.lost(c)
            on_target = {k: c.get(k) for k in [*window.added, *window.changed, *window.deleted]}
        assert m.syncer and await m.syncer.drain(30)
        report = await Verifier(await discover(source.endpoint()), await discover(target.endpoint())).run()
    finally:
        m.stop_requested.set()
        await asyncio.wait_for(task, 30)
    return {"lost": lost, "acked": load.acked, "events": events, "window": window, "on_target": on_target,
            "equal": report.equal, "restored": restored}


def test_seeded_migration_catches_up_the_writes_after_the_snapshot(source: LocalServer,
                                                                    make_server: Callable[..., LocalServer]) -> None:
    target = make_server(engine="valkey9")
    opts = MigrationOptions(gate_settle=0.5, gate_timeout=30, rollback_window=600, verify_in_sync=False)
    r = asyncio.run(seeded_migration(source, target, opts))
    kinds = [e["event"] for e in r["events"]]
    phases = [e["phase"] for e in r["events"] if e["event"] == "phase"]
    assert phases[:3] == ["RouteIn", "Copy", "Sync"], phases
    assert kinds.index("seeding") < kinds.index("seeded") < kinds.index("cutover")
    assert "copied" not in kinds           # no bulk copy: the restore brought the bulk of the data
    assert "repair" not in kinds           # no verify pass either: the marks alone made the target equal
    assert r["restored"]["keys"] >= SEEDED_KEYS
    seeded = next(e for e in r["events"] if e["event"] == "seeded")
    assert seeded["backlog"] >= WINDOW_KEYS + 100 and seeded["overflowed"] == 0, seeded
    w: Window = r["window"]
    on_target = r["on_target"]
    assert {k: on_target[k] for k in w.added} == {k: v.encode() for k, v in w.added.items()}
    assert {k: on_target[k] for k in w.changed} == {k: v.encode() for k, v in w.changed.items()}
    assert [k for k in w.deleted if on_target[k] is not None] == []
    assert r["acked"] > 100 and r["lost"] == []
    assert r["equal"]


def test_a_dirty_set_that_overflows_during_the_restore_gets_the_full_verify_and_repair(
        source: LocalServer, make_server: Callable[..., LocalServer]) -> None:
    target = make_server(engine="valkey9")
    opts = MigrationOptions(gate_settle=0.5, gate_timeout=30, rollback_window=600, verify_in_sync=False,
                            max_dirty=100)
    r = asyncio.run(seeded_migration(source, target, opts))
    seeded = next(e for e in r["events"] if e["event"] == "seeded")
    assert seeded["overflowed"] > 0, seeded
    repairs = [e for e in r["events"] if e["event"] == "repair"]
    assert repairs and "exceeded 100" in repairs[0]["reason"], repairs
    repaired = next(e for e in r["events"] if e["event"] == "repaired")
    assert repaired["keys"] >= WINDOW_KEYS - 100      # what the marks could not hold, the verify found
    w: Window = r["window"]
    assert all(r["on_target"][k] == v.encode() for k, v in w.added.items())
    assert [k for k in w.deleted if r["on_target"][k] is not None] == []
    assert r["lost"] == [] and r["equal"]


def test_a_syncer_without_a_target_collects_marks_and_refuses_to_copy() -> None:
    async def run() -> None:
        syncer = Syncer(None, max_dirty=3)
        syncer.mark(0, [b"a", b"b", b"a"])
        assert syncer.backlog == 2 and syncer.repair_reason is None
        syncer.mark(0, [b"c", b"d"])                 # past max_dirty: the full verify-and-repair
        assert syncer.stats.overflowed == 1 and "exceeded 3" in (syncer.repair_reason or "")
        with pytest.raises(RuntimeError, match="before it has a target"):
            syncer.start()
        await syncer.stop()
        await syncer.close_pools(current=True)       # nothing to close, nothing fails
    asyncio.run(run())


def test_a_migration_needs_a_target_or_a_way_to_seed_one() -> None:
    with pytest.raises(ValueError, match="seed_target"):
        Migration(Endpoint("127.0.0.1", 1), None, MigrationOptions(), local_proxies("127.0.0.1", 0))
