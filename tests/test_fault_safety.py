"""Faults of the servers around DurableCache (docs/protocol.md, "Faults around DurableCache"): a side
that restarts empty, someone's FLUSHALL on the target, a client writing to the source around the proxy,
a rollback after the target lost its data, an authoritative source that comes back empty. Each runs the
real migration (in-process proxy) between real valkey-server processes under a ledger-keeping write
load, and checks every acknowledged write afterwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from durablecache.migration import Migration, MigrationOptions, Phase
from durablecache.proxyhandles import local_proxies
from durablecache.repairplan import RepairPlan
from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.waiting import wait_for
from durablecache.testing.workload import Workload, seed
from durablecache.topology import discover
from durablecache.verify import Verifier
from durablecache.witness import NodeIdentity, SideReading, count_mismatch, identity_changes

SEED_KEYS = 3000
WAIT = 60.0


class Run:
    """One migration with manual cutover under a ledger-keeping load, its events awaitable."""

    def __init__(self, source: LocalServer, target: LocalServer, **opts: Any):
        self.source, self.target = source, target
        first = getattr(source, "nodes", [source])[0]
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.load = Workload("127.0.0.1", first.port, writers=3, rate=150)
        options = dict(cutover="manual", gate_settle=0.3, gate_timeout=30, rollback_window=600,
                       copy_concurrency=4, watch_interval=0.2)
        options.update(opts)
        self.m = Migration(source.endpoint(), target.endpoint(), MigrationOptions(**options),
                           local_proxies("127.0.0.1", 0), emit=self._emit)
        self.task: asyncio.Task[Phase] | None = None

    def _emit(self, e: dict[str, Any]) -> None:
        self.events.append(e)
        if e["event"] == "proxies":
            host, port = e["addresses"][0].rsplit(":", 1)
            self.load.point_at(host, int(port))
        self._changed.set()

    async def start(self) -> None:
        self.load.start()
        self.task = asyncio.create_task(self.m.run())

    async def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = WAIT,
                   after: int = 0) -> dict[str, Any]:
        """The first event from index ``after`` on that satisfies ``pred``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for e in self.events[after:]:
                        if pred(e):
                            return e
                    if self.task and self.task.done():
                        await self.abort()
                        raise AssertionError(f"migration ended: {self.task.exception()!r}; {self.events[-8:]}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            await self.abort()
            raise AssertionError(f"event not seen in {timeout:.0f}s; last events: {self.events[-12:]}") from None

    async def abort(self) -> None:
        """A failed test still stops its writers and its migration, within bounds, so that nothing it
        started outlives it (asyncio.run would otherwise wait on them)."""
        self.load.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self.load._tasks, return_exceptions=True), 10)
        self.m.stop_requested.set()
        if self.task and not self.task.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.task, 30)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    async def writes_go_on(self, more: int = 30, timeout: float = WAIT) -> None:
        """Wait until the writers had ``more`` further writes acknowledged."""
        await self.load.writes_go_on(more, timeout)

    async def cut_over_and_stop(self) -> None:
        """Approve, wait for the cutover, end the load, let reverse sync catch up, stop."""
        self.m.approved.set()
        await self.wait(event("cutover"))
        await self.writes_go_on()       # to the target now
        await self.load.finish()
        assert self.m.syncer and await self.m.syncer.drain(30)
        await self.stop()

    async def stop(self) -> None:
        if not self.load.stop.is_set():
            await self.load.finish()
        self.m.stop_requested.set()
        if self.task:
            await asyncio.wait_for(self.task, 30)


def seed_and_close(server: LocalServer, keys: int) -> None:
    """Seed, then close the connection: one left open is a client on the source around the proxy,
    which rightly holds the RouteIn gate and every cutover (until garbage collection closes it)."""
    with contextlib.closing(server.client()) as client:
        seed(client, keys)


def event(kind: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["event"] == kind and all(e.get(k) == v for k, v in fields.items())


async def verify_equal(a: LocalServer, b: LocalServer) -> bool:
    return (await Verifier(await discover(a.endpoint()), await discover(b.endpoint())).run()).equal


def in_thread(fn: Callable[[], Any]) -> Any:
    return asyncio.to_thread(fn)


def test_a_target_that_restarts_empty_during_sync_is_never_cut_over_to(make_server):
    """The issue's first reproduction: the target restarts empty, the cutover is approved at once.
    The last check before FLIP (or the watch, whichever sees it first) aborts, the repair re-copies,
    and the cutover that follows loses nothing."""
    source, target = make_server(), make_server(engine="valkey9")
    seed_and_close(source, SEED_KEYS)

    async def scenario() -> Run:
        run = Run(source, target)
        await run.start()
        await run.wait(event("awaiting_approval"))
        await in_thread(target.restart)
        await run.cut_over_and_stop()
        return run

    run = asyncio.run(scenario())
    noticed = run.kinds("side_changed") + [e for e in run.kinds("cutover_aborted") if "changed" in e["reason"]]
    assert noticed, run.events
    assert any(e["side"] == "target" for e in run.kinds("side_changed")) or run.kinds("cutover_aborted")
    assert run.load.acked > 100
    assert run.load.lost(target.client()) == []
    assert target.client().dbsize() >= SEED_KEYS
    assert asyncio.run(verify_equal(source, target))


def test_a_flushall_on_the_target_is_caught_by_the_count_witness_before_flip(make_server):
    """No server restarted, so no identity changed: only the key counts inside the pause can tell."""
    source, target = make_server(), make_server(engine="valkey9")
    seed_and_close(source, SEED_KEYS)

    async def scenario() -> Run:
        run = Run(source, target, watch_interval=3600)     # the watch never looks again: the witness must
        await run.start()
        await run.wait(event("awaiting_approval"))
        await in_thread(lambda: target.client().flushall())
        await run.cut_over_and_stop()
        return run

    run = asyncio.run(scenario())
    aborted = run.kinds("cutover_aborted")
    assert aborted and "keys without expiry" in aborted[0]["reason"], run.events
    assert run.load.lost(target.client()) == []
    assert asyncio.run(verify_equal(source, target))


def test_a_client_writing_to_the_source_directly_holds_the_cutover_until_it_leaves(make_server):
    """The issue's fourth reproduction: a direct writer connected during Sync. No cutover starts while
    it is connected; once it leaves, a repair brings its writes over before the cutover."""
    source, target = make_server(), make_server(engine="valkey9")
    seed_and_close(source, SEED_KEYS)

    async def scenario() -> Run:
        run = Run(source, target)
        await run.start()
        await run.wait(event("awaiting_approval"))
        direct = source.client()
        mark = len(run.events)
        for i in range(50):
            direct.set(f"direct:{i}", i)
        direct.incrby("direct:counter", 7)
        run.m.approved.set()
        blocked = await run.wait(event("gate_blocked", phase="Sync"), after=mark)
        assert blocked["clients"]
        assert not run.kinds("cutover")            # held while the client is connected
        await in_thread(direct.close)
        await run.cut_over_and_stop()
        return run

    run = asyncio.run(scenario())
    t = target.client()
    assert [t.get(f"direct:{i}") for i in range(50)] == [str(i).encode() for i in range(50)]
    assert t.get("direct:counter") == b"7"
    assert any("directly" in (e.get("reason") or "") for e in run.kinds("repair"))
    assert run.load.lost(t) == []


def test_a_rollback_after_the_target_lost_its_data_keeps_the_source(make_server):
    """The issue's second reproduction: after FLIP the target restarts empty; the rollback must not
    copy that loss onto the source. Every acknowledged write (reverse-synced before the crash) and
    every seeded key is on the source after the rollback."""
    source, target = make_server(), make_server(engine="valkey9")
    seed_and_close(source, SEED_KEYS)

    async def scenario() -> Run:
        run = Run(source, target)
        await run.start()
        await run.wait(event("awaiting_approval"))
        run.m.approved.set()
        await run.wait(event("cutover"))
        await run.writes_go_on()                   # on the target, reverse-synced to the source
        await run.load.finish()
        assert run.m.syncer and await run.m.syncer.drain(30)
        mark = len(run.events)
        await in_thread(target.restart)
        await run.wait(event("side_changed", side="target", authoritative=True), after=mark)
        run.m.rollback_requested.set()
        await run.wait(event("rolled_back"))
        await run.stop()
        return run

    run = asyncio.run(scenario())
    s = source.client()
    assert s.dbsize() >= SEED_KEYS
    assert run.load.lost(s) == []
    assert run.kinds("rollback_restores")


def test_a_source_that_comes_back_empty_stops_the_repair_and_asks(make_server):
    """The authoritative source restarts empty during Sync: repairing the target from it would wipe
    the only copy. The repair stops and asks (nothing written); once accepted it goes ahead."""
    source, target = make_server(), make_server(engine="valkey9")
    seed_and_close(source, SEED_KEYS)

    async def scenario() -> Run:
        run = Run(source, target)
        await run.start()
        await run.wait(event("awaiting_approval"))
        await run.load.finish()
        await in_thread(source.restart)
        blocked = await run.wait(event("repair_blocked"))
        assert blocked["delete"] >= SEED_KEYS and blocked["side"] == "target"
        assert run.m.status()["repairBlocked"]["message"] == blocked["message"]
        assert target.client().dbsize() >= SEED_KEYS       # nothing was written
        run.m.repair_accepted.set()
        await run.wait(event("repaired", delete=blocked["delete"]))
        await run.stop()
        return run

    run = asyncio.run(scenario())
    assert any(e["authoritative"] and e["side"] == "source" for e in run.kinds("side_changed"))
    assert target.client().dbsize() == source.client().dbsize()


def test_a_failover_in_the_target_cluster_is_noticed_and_repaired_before_the_cutover(make_cluster):
    """Cluster mode: a replica of the target takes over its shard (CLUSTER FAILOVER) during Sync. The
    old primary is a replica now: the side changed, a repair runs on the new slot map, then the cutover."""
    source, target = make_cluster(primaries=3), make_cluster(primaries=3, replicas=1, engine="valkey9")
    client = source.cluster_client()
    seed(client, SEED_KEYS)
    client.close()        # a client left connected to the source would block the RouteIn gate
    replica = target.nodes[3]

    async def scenario() -> Run:
        run = Run(source, target)        # type: ignore[arg-type]
        run.load = Workload("127.0.0.1", source.nodes[0].port, writers=3, rate=150, cluster=True)
        await run.start()
        await run.wait(event("awaiting_approval"))
        mark = len(run.events)
        await in_thread(lambda: replica.client().execute_command("CLUSTER", "FAILOVER"))
        changed = await run.wait(event("side_changed", side="target"), after=mark)
        assert any("failover" in c for c in changed["changes"]), changed
        await run.cut_over_and_stop()
        return run

    run = asyncio.run(scenario())
    assert run.load.lost(target.cluster_client()) == []
    assert asyncio.run(verify_equal(source, target))          # type: ignore[arg-type]


# -- the pieces, without servers ---------------------------------------------------------------------
def node(run_id: str, role: str = "master", node_id: str = "", port: int = 1) -> NodeIdentity:
    return NodeIdentity(f"127.0.0.1:{port}", run_id, role, node_id)


def test_identity_changes_name_restarts_failovers_and_replaced_nodes():
    assert identity_changes((node("a"),), (node("a"),)) == []
    assert "restarted" in identity_changes((node("a"),), (node("b"),))[0]
    assert "failover" in identity_changes((node("a"),), (node("a", "slave"),))[0]
    assert "another cluster node" in identity_changes((node("a", node_id="x"),), (node("a", node_id="y"),))[0]
    moved = identity_changes((node("a"), node("b", port=2)), (node("c", port=3), node("b", port=2)))
    assert moved == ["127.0.0.1:1 is no longer a primary (a failover or a node removed)",
                     "127.0.0.1:3 is a primary now (a failover or a node added)"]


@pytest.mark.parametrize(("a", "b", "equal"), [
    (({0: 100}, {0: 30}), ({0: 100}, {0: 30}), True),
    (({0: 100}, {0: 30}), ({0: 99}, {0: 30}), False),         # a persistent key missing: never explained
    (({0: 1000}, {0: 1000}), ({0: 950}, {0: 950}), True),     # volatile keys expiring at their own pace
    (({0: 1000}, {0: 1000}), ({0: 0}, {0: 0}), False),        # an emptied target
    (({0: 10, 3: 5}, {}), ({0: 10}, {}), False),              # a whole db missing
])
def test_the_count_witness(a, b, equal):
    ra, rb = SideReading((), *a), SideReading((), *b)
    assert (count_mismatch(ra, rb, "source", "target") is None) is equal


def test_a_repair_plan_counts_what_it_would_destroy_and_leaves_live_keys_out():
    plan = RepairPlan(pending=lambda dk: dk[1] == b"live")
    for kind, key in [("missing", b"a"), ("extra", b"b"), ("value", b"c"), ("ttl", b"d"), ("value", b"live")]:
        plan.record(kind, 0, key)
    assert plan.summary() == {"add": 1, "delete": 1, "overwrite": 2, "live": 1}
    assert plan.destructive == 3
    assert not plan.too_destructive(written_keys=1000, max_share=0.05, min_keys=2)
    assert plan.too_destructive(written_keys=10, max_share=0.05, min_keys=2)
    assert sorted(plan.to_copy()) == [(0, b"a"), (0, b"b"), (0, b"c"), (0, b"d")]


def test_a_blocked_repair_and_changed_servers_show_in_the_metrics():
    from durablecache.k8s.metrics import Metrics

    m = Metrics()
    labels = {"namespace": "shop", "name": "sessions"}
    m.observe({"metadata": labels, "status": {"phase": "Sync", "repairBlocked": "a repair would delete ...",
                                              "sideChanges": 2}})
    assert m.registry.get_sample_value("durablecache_repair_blocked", labels) == 1
    assert m.registry.get_sample_value("durablecache_side_changes", labels) == 2
    m.observe({"metadata": labels, "status": {"phase": "Sync", "sideChanges": 2}})
    assert m.registry.get_sample_value("durablecache_repair_blocked", labels) == 0


def move_slot(cluster: Any, slot: int, src: int, dst: int) -> int:
    """Reshard one slot, keys and all, from primary ``src`` to ``dst`` as valkey-cli does (IMPORTING /
    MIGRATING, MIGRATE in batches, SETSLOT NODE everywhere); returns how many keys moved."""
    owner, other = cluster.primaries[src].client(), cluster.primaries[dst].client()
    owner_id, other_id = (c.execute_command("CLUSTER", "MYID").decode() for c in (owner, other))
    other.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", owner_id)
    owner.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", other_id)
    moved = 0
    for _ in range(10_000):
        keys = owner.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        if not keys:
            break
        owner.execute_command("MIGRATE", "127.0.0.1", cluster.primaries[dst].port, "", 0, 5000, "REPLACE",
                              "KEYS", *keys)
        moved += len(keys)
    for node in cluster.primaries:
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", other_id)
    return moved


@pytest.mark.parametrize("phase", ["Copy", "Sync"])
def test_a_slot_moving_in_the_source_cluster_loses_nothing(make_cluster, phase):
    """A reshard of the source while it is copied or kept in sync: keys move between primaries under
    the copy's SCAN and the proxy's writes (MIGRATE, then MOVED). Nothing acknowledged is lost and the
    sides end equal."""
    from valkey.crc import key_slot

    source, target = make_cluster(primaries=3), make_cluster(primaries=3, engine="valkey9")
    client = source.cluster_client()
    seed(client, 20_000)
    client.close()
    slot = key_slot(b"seed:1")
    src = next(i for i, n in enumerate(source.primaries)
               if n.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))

    async def scenario() -> tuple[Run, int]:
        run = Run(source, target, max_source_ops=20_000 if phase == "Copy" else None)   # type: ignore[arg-type]
        run.load = Workload("127.0.0.1", source.nodes[0].port, writers=3, rate=150, cluster=True)
        await run.start()
        await run.wait(event("phase", phase="Copy") if phase == "Copy" else event("awaiting_approval"))
        moved = await in_thread(lambda: move_slot(source, slot, src, (src + 1) % 3))
        await run.cut_over_and_stop()
        return run, moved

    run, moved = asyncio.run(scenario())
    assert moved > 0
    assert run.load.lost(target.cluster_client()) == []
    assert asyncio.run(verify_equal(source, target))          # type: ignore[arg-type]


def test_a_failover_of_the_standalone_source_holds_the_repair_until_it_leads_to_a_primary(make_server):
    """The source's replica is promoted and its primary demoted during Sync (what an ElastiCache
    failover does behind the primary endpoint). The address DurableCache was given now leads to a
    replica: it says so, repairs nothing against a replica, cuts over nothing; once the address leads
    to a primary again (failed back), the repair and the cutover follow and nothing acknowledged is lost."""
    primary = make_server()
    replica = make_server(extra=["--replicaof", "127.0.0.1", str(primary.port)])
    target = make_server(engine="valkey9")
    seed_and_close(primary, SEED_KEYS)

    def linked(node: LocalServer) -> bool:
        return node.client().info("replication").get("master_link_status") == "up"

    wait_for("the replica to sync", lambda: linked(replica), 30)

    async def scenario() -> Run:
        run = Run(primary, target)
        await run.start()
        await run.wait(event("awaiting_approval"))
        mark = len(run.events)

        # FAILOVER, as ElastiCache's own: the primary pauses writes until its replica has them all,
        # then the two swap roles. (Two REPLICAOF calls would let the old primary acknowledge writes
        # that its resync from the new primary then drops: a loss on the source, not DurableCache's.)
        def fail_over() -> None:
            primary.client().execute_command("FAILOVER")
            wait_for("the old primary to follow", lambda: linked(primary), 30)
        await in_thread(fail_over)
        changed = await run.wait(event("side_changed", side="source"), after=mark)
        assert changed["authoritative"] and any("failover" in c for c in changed["changes"]), changed
        run.m.approved.set()
        waiting = await run.wait(event("repair_interrupted"), after=mark)
        assert "replica now" in waiting["reason"]
        assert not [e for e in run.events[mark:] if e["event"] == "cutover"]

        def fail_back() -> None:
            replica.client().execute_command("FAILOVER")
        await in_thread(fail_back)
        await run.cut_over_and_stop()
        return run

    run = asyncio.run(scenario())
    assert run.load.lost(target.client()) == []
    assert asyncio.run(verify_equal(primary, target))
