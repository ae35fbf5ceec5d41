"""The acceptance test of the migration: writers through the proxy for the whole migration, every
acknowledged write present on the target after cutover, both sides equal — standalone, cluster, and
with the proxy process killed during Sync."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.request
from typing import Any

import pytest

from durablecache.errors import ConnectError
from durablecache.migration import Migration, MigrationOptions, Phase
from durablecache.ports import free_port
from durablecache.proxy import Proxy
from durablecache.proxyhandles import LocalProxy, local_proxies
from durablecache.testing.localvalkey import stop_process
from durablecache.testing.waiting import wait_for_async
from durablecache.testing.workload import Workload, seed
from durablecache.topology import discover
from durablecache.urls import Endpoint
from durablecache.verify import Verifier
from keyspace import CLI, run_cli


async def equal(source_ep, target_ep) -> bool:
    report = await Verifier(await discover(source_ep), await discover(target_ep)).run()
    return report.equal


async def migrate_under_load(source, target, cluster: bool, keys: int = 5000) -> dict[str, Any]:
    client = source.cluster_client() if cluster else source.client()
    seed(client, keys)
    client.close()
    first = source.nodes[0] if cluster else source
    load = Workload("127.0.0.1", first.port, writers=4, rate=400, cluster=cluster)
    load.start()
    events: list[dict[str, Any]] = []
    cut = asyncio.Event()

    def emit(e: dict[str, Any]) -> None:
        events.append(e)
        if e["event"] == "proxies":
            host, port = e["addresses"][0].rsplit(":", 1)
            load.point_at(host, int(port))
        if e["event"] == "cutover":
            cut.set()

    opts = MigrationOptions(gate_settle=0.5, gate_timeout=30, rollback_window=600, copy_concurrency=4)
    m = Migration(source.endpoint(), target.endpoint(), opts, local_proxies("127.0.0.1", 0), emit=emit)
    task = asyncio.create_task(m.run())
    await asyncio.wait([task, asyncio.create_task(cut.wait())], timeout=120, return_when=asyncio.FIRST_COMPLETED)
    assert cut.is_set(), (task.exception() if task.done() else "no cutover in 120 s", events[-5:])
    await load.writes_go_on(50, 30)  # writes go on after cutover, now landing on the target
    await load.finish()
    target_client = target.cluster_client() if cluster else target.client()
    lost = load.lost(target_client)
    assert m.syncer and await m.syncer.drain(30)  # reverse sync: the source catches up as well
    sides_equal = await equal(source.endpoint(), target.endpoint())
    m.stop_requested.set()
    await asyncio.wait_for(task, 30)
    return {"lost": lost, "acked": load.acked, "equal": sides_equal, "events": events, "load": load}


def test_zero_loss_standalone(source, target):
    r = asyncio.run(migrate_under_load(source, target, cluster=False))
    assert r["acked"] > 1000
    assert r["lost"] == []
    assert r["equal"]
    phases = [e["phase"] for e in r["events"] if e["event"] == "phase"]
    for p in ("RouteIn", "Copy", "Sync", "Cutover", "RouteOut"):
        assert p in phases
    pause = next(e for e in r["events"] if e["event"] == "cutover")["pause_ms"]
    assert pause < 1000


def test_zero_loss_cluster(make_cluster):
    source, target = make_cluster(primaries=3), make_cluster(primaries=3, engine="valkey9")
    r = asyncio.run(migrate_under_load(source, target, cluster=True, keys=3000))
    assert r["acked"] > 1000
    assert r["lost"] == []
    assert r["equal"]


class Events:
    """JSON lines from a `durablecache migrate --json` child, read with bounded waits."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.proc = proc
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.q.put(json.loads(line))

    def wait(self, pred, timeout: float = 60) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                e = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(e)
            if pred(e):
                return e
        raise AssertionError(f"event not seen in {timeout}s; last events: {self.seen[-8:]}")


def control(port: int, token: str, path: str, method: str = "POST") -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.timeout(240)
def test_proxy_killed_during_sync_forces_repair_and_loses_nothing(source, target, tmp_path):
    with contextlib.closing(source.client()) as client:   # left open, it would hold the gate
        seed(client, 3000)
    listen, control_port = free_port(), free_port()
    token_file = tmp_path / "token"
    proc = subprocess.Popen(
        [*CLI, "migrate", "--source", source.url(), "--target", target.url(), "--listen", f"127.0.0.1:{listen}",
         "--proxy-mode", "subprocess", "--cutover", "manual", "--gate-settle", "0.5", "--json",
         "--control", f"127.0.0.1:{control_port}", "--control-token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    events = Events(proc)
    load = Workload("127.0.0.1", source.port, writers=3, rate=300)

    async def scenario() -> list[str]:
        load.start()
        child = await asyncio.to_thread(events.wait, lambda e: e["event"] == "proxy_process")
        with open(f"/proc/{child['pid']}/cmdline", "rb") as f:
            assert b"--upstream" not in f.read(), "the upstream URL (and its password) must not be in argv"
        assert token_file.stat().st_mode & 0o777 == 0o600
        load.point_at("127.0.0.1", listen)
        await asyncio.to_thread(events.wait, lambda e: e.get("event") == "awaiting_approval", 90)
        await load.writes_go_on(50, 30)        # writes (and their marks) flow through the proxy process
        os.kill(child["pid"], signal.SIGKILL)  # marks in flight die with it
        # What such a lost mark leaves behind: a write applied on the source that no mark announces.
        stray = source.client()
        stray.set("seed:0", "applied-but-never-marked")
        stray.close()
        await asyncio.to_thread(events.wait, lambda e: e["event"] == "proxy_process" and e["pid"] != child["pid"])
        await load.writes_go_on(50, 30)  # writers reconnect to the restarted proxy
        # The lost mark stream demands a repair, which runs at once (a migration awaiting approval
        # repairs a fault when it happens, not at approval).
        def repair_for_lost_marks(e: dict[str, Any]) -> bool:
            return e["event"] == "repair" and "mark stream" in (e.get("reason") or "")
        if not any(repair_for_lost_marks(e) for e in events.seen):
            await asyncio.to_thread(events.wait, repair_for_lost_marks)
        start = next(i for i, e in enumerate(events.seen) if repair_for_lost_marks(e))
        repaired = next((e for e in events.seen[start:] if e["event"] == "repaired"), None) or \
            await asyncio.to_thread(events.wait, lambda e: e["event"] == "repaired", 90)
        assert repaired["keys"] >= 1        # the stray write, found and copied
        ctl = ["--control", f"127.0.0.1:{control_port}", "--control-token-file", str(token_file)]
        res = await asyncio.to_thread(run_cli, "control", "approve", *ctl)
        assert res.returncode == 0 and '"approved": true' in res.stdout, res
        await asyncio.to_thread(events.wait, lambda e: e["event"] == "cutover", 90)
        await load.writes_go_on(50, 30)
        await load.finish()
        return load.lost(target.client())

    try:
        lost = asyncio.run(scenario())
        assert load.acked > 500
        assert lost == []
        assert target.client().get("seed:0") == b"applied-but-never-marked"
    finally:
        stop_process(proc, 20)


def test_migrate_cli_reports_phases_and_pause(source, target):
    with contextlib.closing(source.client()) as client:   # left open, it would hold the gate
        seed(client, 1000)
    listen = free_port()
    res = subprocess.run([*CLI, "migrate", "--source", source.url(), "--target", target.url(), "--listen",
                          f"127.0.0.1:{listen}", "--gate-settle", "0.2", "--exit-after-cutover", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    phases = [x["phase"] for x in lines if x["event"] == "phase"]
    # The engine starts at RouteIn: Preflight and Provision are the operator's (durablecache.phases).
    assert phases[0] == "RouteIn" and phases[-1] == "Complete"
    assert len(phases) == len(set(phases)), phases  # each phase announced once (`Sync` used to come twice)
    # A healthy migration's only verify-and-repair is the planned pass after the copy (a Normal
    # `Verifying` event in the operator, not a Warning `RepairRequired`).
    repairs = [x for x in lines if x["event"] == "repair"]
    assert repairs and all(x.get("planned") for x in repairs), repairs
    cut = next(x for x in lines if x["event"] == "cutover")
    assert 0 < cut["pause_ms"] < 1000
    assert target.client().dbsize() == source.client().dbsize() == 1000


def test_gate_blocks_on_a_client_writing_around_the_proxy(source, target):
    stray = source.client()
    stray.client_setname("cart-api")
    stray.ping()  # keeps a connection open, as an application that was not moved would
    res = subprocess.run([*CLI, "migrate", "--source", source.url(), "--target", target.url(), "--listen",
                          f"127.0.0.1:{free_port()}", "--gate-settle", "0.2", "--gate-timeout", "1.5", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "cart-api" in res.stderr and "directly" in res.stderr
    assert target.client().dbsize() == 0
    stray.close()


def test_rollback_returns_authority_to_the_source(source, target):
    async def scenario() -> None:
        events: list[dict[str, Any]] = []
        cut = asyncio.Event()

        def emit(e: dict[str, Any]) -> None:
            events.append(e)
            if e["event"] == "cutover":
                cut.set()

        source.client().set("before", "1")
        source.client().connection_pool.disconnect()
        m = Migration(source.endpoint(), target.endpoint(), MigrationOptions(gate_settle=0.2),
                      local_proxies("127.0.0.1", 0), emit=emit)
        task = asyncio.create_task(m.run())
        await asyncio.wait_for(cut.wait(), 60)
        proxy = next(e for e in events if e["event"] == "proxies")["addresses"][0]
        host, port = proxy.rsplit(":", 1)
        import valkey.asyncio as avalkey

        app = avalkey.Valkey(host=host, port=int(port))
        await app.set("after-cutover", "on-target")  # lands on the target, reverse-synced to the source
        # An application that followed RouteOut writes to the target directly, where no proxy sees it.
        direct = target.client()
        direct.set("direct-on-target", "untracked")
        direct.close()  # ... and is moved back to the proxy before the rollback
        m.rollback_requested.set()
        await wait_for_async("RolledBack", lambda: m.phase == Phase.ROLLED_BACK, 10)
        assert source.client().get("after-cutover") == b"on-target"
        # The rollback's repair found the write made around the proxy.
        assert source.client().get("direct-on-target") == b"untracked", events[-8:]
        assert any(e["event"] == "repair" for e in events)
        await app.set("after-rollback", "on-source")
        assert source.client().get("after-rollback") == b"on-source"
        await app.aclose()
        m.stop_requested.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(scenario())


class FlipFailsOnce:
    """Fault injection (no real proxy fails a FLIP on cue): the first flip to port ``fail_to`` really
    happens, then reports an error, as when the acknowledgement of a flip is lost: its outcome is
    unknown to the migration."""

    def __init__(self, inner: LocalProxy, fail_to: int):
        self.inner, self.fail_to, self.failed = inner, fail_to, False
        self.address = inner.address

    async def prepare_flip(self, upstream: Endpoint) -> None:
        await self.inner.prepare_flip(upstream)

    async def unprepare(self) -> None:
        await self.inner.unprepare()

    async def freeze(self, timeout: float) -> None:
        await self.inner.freeze(timeout)

    async def flip(self, upstream: Endpoint) -> None:
        await self.inner.flip(upstream)
        if not self.failed and upstream.port == self.fail_to:
            self.failed = True
            raise ConnectError("injected: the flip's acknowledgement was lost")

    async def unfreeze(self) -> None:
        await self.inner.unfreeze()

    async def hold_keys(self, keys: set[tuple[int, bytes]], timeout: float) -> None:
        await self.inner.hold_keys(keys, timeout)

    async def release_keys(self) -> None:
        await self.inner.release_keys()

    async def stop(self) -> None:
        await self.inner.stop()


def test_a_flip_failing_on_one_of_two_proxies_is_undone_on_both_before_writes_resume(source, target):
    """With several proxies, one that flipped while another's flip failed would write to the target
    while the other writes to the source. The failed cutover flips every proxy back first."""
    async def scenario() -> None:
        proxies: list[LocalProxy] = []

        async def start(upstream: Endpoint, on_marks: Any, _on_lost: Any) -> list[Any]:
            for _ in range(2):
                p = Proxy(upstream, listen_host="127.0.0.1", listen_port=0, on_marks=on_marks)
                await p.start()
                proxies.append(LocalProxy(p))
            return [proxies[0], FlipFailsOnce(proxies[1], target.port)]

        seen: dict[str, Any] = {}
        cut = asyncio.Event()

        def emit(e: dict[str, Any]) -> None:
            if e["event"] == "cutover_aborted" and "aborted" not in seen:
                seen["aborted"] = ([h.proxy.upstream.port for h in proxies], e["reason"])
            if e["event"] == "cutover":
                seen["cutover"] = [h.proxy.upstream.port for h in proxies]
                cut.set()

        m = Migration(source.endpoint(), target.endpoint(), MigrationOptions(gate_settle=0.2), start, emit=emit)
        task = asyncio.create_task(m.run())
        await asyncio.wait_for(cut.wait(), 60)
        ports, reason = seen["aborted"]
        assert "injected" in reason
        assert ports == [source.port, source.port]       # unfrozen only once both serve the source again
        assert seen["cutover"] == [target.port, target.port]
        m.stop_requested.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(scenario())


class PrepareFailsOnce(LocalProxy):
    """Fault injection (no real target becomes unreachable on cue): the first PREPARE fails."""

    def __init__(self, proxy: Proxy):
        super().__init__(proxy)
        self.failed = False
        self.freezes = 0

    async def prepare_flip(self, upstream: Endpoint) -> None:
        if not self.failed:
            self.failed = True
            raise ConnectError("injected: the target cannot be reached")
        await super().prepare_flip(upstream)

    async def freeze(self, timeout: float) -> None:
        self.freezes += 1
        await super().freeze(timeout)


def test_a_target_the_proxies_cannot_discover_aborts_the_cutover_before_any_write_is_held(source, target):
    async def scenario() -> None:
        handles: list[PrepareFailsOnce] = []

        async def start(upstream: Endpoint, on_marks: Any, _on_lost: Any) -> list[Any]:
            p = Proxy(upstream, listen_host="127.0.0.1", listen_port=0, on_marks=on_marks)
            await p.start()
            handles.append(PrepareFailsOnce(p))
            return handles

        events: list[dict[str, Any]] = []
        cut = asyncio.Event()

        def emit(e: dict[str, Any]) -> None:
            if e["event"] == "cutover_aborted":
                events.append({**e, "freezes": handles[0].freezes})
            if e["event"] == "cutover":
                events.append(e)
                cut.set()

        m = Migration(source.endpoint(), target.endpoint(), MigrationOptions(gate_settle=0.2), start, emit=emit)
        task = asyncio.create_task(m.run())
        await asyncio.wait_for(cut.wait(), 60)
        aborted, done = events
        assert "injected" in aborted["reason"] and aborted["pause_ms"] == 0.0 and aborted["freezes"] == 0
        assert done["event"] == "cutover" and done["attempt"] == 2 and handles[0].freezes == 1
        m.stop_requested.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(scenario())


@pytest.mark.parametrize("drain_budget", [None, 0.05])
def test_the_drain_gets_the_drain_budget_or_what_freeze_left_of_the_write_pause(source, target, drain_budget):
    """spec.cutover.drainBudget / --drain-budget: the cutover's DRAIN waits at most that long inside
    maxWritePause; unset, it gets what FREEZE left. (A spy on the real syncer's drain records what
    it was given; the cutover runs for real.)"""
    freeze_s: list[float] = []

    async def scenario() -> list[float]:
        given: list[float] = []
        cut = asyncio.Event()

        def emit(e: dict[str, Any]) -> None:
            if e["event"] == "cutover":
                freeze_s.append(e["freeze_ms"] / 1000)
                cut.set()

        opts = MigrationOptions(gate_settle=0.2, max_write_pause=2.0, drain_budget=drain_budget)
        m = Migration(source.endpoint(), target.endpoint(), opts, local_proxies("127.0.0.1", 0), emit=emit)
        task = asyncio.create_task(m.run())
        await wait_for_async("the migration's syncer", lambda: m.syncer, 30)
        assert m.syncer is not None
        real_drain = m.syncer.drain

        async def recorded(timeout: float) -> bool:
            given.append(timeout)
            return await real_drain(timeout)
        m.syncer.drain = recorded  # type: ignore[method-assign]
        await asyncio.wait_for(cut.wait(), 60)
        m.stop_requested.set()
        await asyncio.wait_for(task, 30)
        return given

    with contextlib.closing(source.client()) as client:   # left open, it would hold the gate
        seed(client, 500)
    given = asyncio.run(scenario())
    assert len(given) == 1                       # one cutover attempt, which succeeded
    if drain_budget is None:
        left = 2.0 - freeze_s[0]                 # the write pause, less the time FREEZE took (freeze_ms
        assert left - 0.2 < given[0] <= left + 1e-4   # is rounded to 0.01 ms)
    else:
        assert given[0] == drain_budget


def test_a_drain_budget_over_the_write_pause_is_refused_up_front(source, target):
    proc = run_cli("migrate", "--source", source.url(), "--target", target.url(), "--listen",
                   f"127.0.0.1:{free_port()}", "--max-write-pause", "100ms", "--drain-budget", "150ms")
    assert proc.returncode == 2
    assert "--drain-budget (150 ms) must not exceed --max-write-pause (100 ms)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(180)
@pytest.mark.parametrize("phase", ["Copy", "Sync", "RouteOut"])
def test_migrate_killed_in_a_phase_resumes_from_its_state_file_without_loss(source, target, tmp_path, phase):
    with contextlib.closing(source.client()) as client:   # left open, it would hold the gate
        seed(client, 20_000)
    listen, control_port = free_port(), free_port()
    token_file, state = tmp_path / "token", tmp_path / "state.json"
    args = [*CLI, "migrate", "--source", source.url(), "--target", target.url(), "--listen", f"127.0.0.1:{listen}",
            "--cutover", "manual", "--gate-settle", "0.3", "--json", "--state-file", str(state),
            "--control", f"127.0.0.1:{control_port}", "--control-token-file", str(token_file)]
    if phase == "Copy":
        args += ["--max-ops", "15000"]  # slow enough to be caught copying
    load = Workload("127.0.0.1", source.port, writers=3, rate=200)
    procs: list[subprocess.Popen[str]] = []

    def start() -> Events:
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        return Events(procs[-1])

    def is_phase(name: str):  # type: ignore[no-untyped-def]
        return lambda e: e["event"] == "phase" and e["phase"] == name

    async def scenario() -> list[str]:
        load.start()
        events = start()
        await asyncio.to_thread(events.wait, lambda e: e["event"] == "proxies")
        load.point_at("127.0.0.1", listen)
        if phase == "RouteOut":
            await asyncio.to_thread(events.wait, lambda e: e["event"] == "awaiting_approval", 60)
            control(control_port, token_file.read_text().strip(), "/approve")
        await asyncio.to_thread(events.wait, is_phase(phase), 60)
        await load.writes_go_on(30, 30)
        procs[-1].kill()  # the process, its proxy and its in-memory marks are gone at once
        procs[-1].wait(10)
        assert json.loads(state.read_text())["phase"] == phase
        events = start()
        await asyncio.to_thread(events.wait, lambda e: e["event"] == "proxies", 60)
        if phase == "RouteOut":
            await asyncio.to_thread(events.wait, lambda e: e["event"] == "route_out", 60)
        else:
            await asyncio.to_thread(events.wait, lambda e: e["event"] == "awaiting_approval", 90)
            control(control_port, token_file.read_text().strip(), "/approve")
            await asyncio.to_thread(events.wait, lambda e: e["event"] == "cutover", 60)
        await load.writes_go_on(50, 30)
        await load.finish()
        return load.lost(target.client())

    try:
        lost = asyncio.run(scenario())
        assert load.acked > 200
        assert lost == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
