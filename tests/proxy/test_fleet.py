"""A coordinator with a fleet of joined `durablecache proxy --join` processes (docs/ha.md): proxies
killed or added in Sync, killed inside a cutover attempt, joining during a freeze; each migration
reaches Complete under write load with no acknowledged write lost. Fencing and fail closed."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import valkey
import valkey.asyncio as avalkey

from durablecache.commands.migrate import proxy_starter
from durablecache.errors import FencedError
from durablecache.fleet import Fleet, Member
from durablecache.fleettls import FleetTLS
from durablecache.migration import Migration, ProxyHandle
from durablecache.options import MigrationOptions
from durablecache.phases import Phase
from durablecache.ports import free_port
from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.waiting import wait_for_async
from durablecache.testing.workload import Workload, seed
from durablecache.urls import Endpoint

pytestmark = pytest.mark.timeout(180)
TOKEN = "fleet-secret"


class ProxyProc:
    """One `durablecache proxy --join` child."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, port: int, log: Path):
        self.proc, self.name, self.port, self.log = proc, name, port, log

    @classmethod
    async def join(cls, coordinator_port: int, token_file: Path, name: str, extra: Sequence[str] = ()) -> ProxyProc:
        """``extra``: more flags (the fleet's TLS)."""
        port = free_port()
        log = token_file.parent / f"{name}.log"
        with open(log, "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "durablecache.cli", "--log-json", "proxy", "--join",
                f"127.0.0.1:{coordinator_port}", "--join-token-file", str(token_file), "--admin", "127.0.0.1:0",
                "--listen", f"127.0.0.1:{port}", "--proxy-id", name, *extra, stdout=asyncio.subprocess.DEVNULL,
                stderr=err)
        return cls(proc, name, port, log)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Run:
    """A migration whose proxies all join its fleet; events are awaited, never slept on."""

    def __init__(self, source: LocalServer, target: LocalServer, tmp: Path, extra: list[ProxyHandle] | None = None,
                 tls: FleetTLS | None = None, **opts: Any):
        self.source, self.target = source, target
        self.token_file = tmp / "join.token"
        self.token_file.write_text(TOKEN + "\n")
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.hooks: list[Callable[[dict[str, Any]], None]] = []
        self.fleet = Fleet(TOKEN, port=0, emit=self.emit, epoch=opts.get("epoch", 0), tls=tls)
        # Each proxy process is given the coordinator's certificate and key, if it has them.
        self.proxy_flags = ["--fleet-tls-cert", tls.cert, "--fleet-tls-key", tls.key] if tls else []
        self.extra = extra or []
        starter, _ = proxy_starter("127.0.0.1", 0, "inprocess", self.emit, fleet=self.fleet, spawn=False)

        async def start(upstream: Endpoint, on_marks: Any, on_lost: Any) -> list[ProxyHandle]:
            return [*self.extra, *await starter(upstream, on_marks, on_lost)]

        options = dict(cutover="manual", gate_settle=0.3, gate_timeout=60, rollback_window=1.0, copy_concurrency=4)
        options.update(opts)
        self.m = Migration(source.endpoint(), target.endpoint(), MigrationOptions(**options), start, emit=self.emit)
        self.proxies: dict[str, ProxyProc] = {}
        self.loads: list[Workload] = []

    def emit(self, e: dict[str, Any]) -> None:
        self.events.append(e)
        for hook in list(self.hooks):
            hook(e)
        self._changed.set()

    async def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60.0,
                   since: int = 0) -> dict[str, Any]:
        """The first event from index ``since`` on that ``pred`` accepts, within ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for e in self.events[seen:]:
                if pred(e):
                    return e
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0 or (self.task.done() and not any(pred(e) for e in self.events[seen:])):
                raise AssertionError(f"event not seen: {self.events[-8:]}; "
                                     f"{self.task.exception() if self.task.done() else ''}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def add_proxy(self, name: str, port: int | None = None) -> ProxyProc:
        """A proxy process that joins the coordinator (at ``port``: a relay to it)."""
        p = await ProxyProc.join(port or self.fleet.port, self.token_file, name, self.proxy_flags)
        self.proxies[name] = p
        await self.wait(lambda e: e["event"] == "proxy_joined" and e["proxy"] == name, 30)
        return p

    def load_through(self, p: ProxyProc, prefix: str) -> Workload:
        load = Workload("127.0.0.1", p.port, writers=2, rate=300, prefix=prefix)
        load.start()
        self.loads.append(load)
        return load

    async def start(self, proxies: int = 2) -> None:
        client = self.source.client()
        seed(client, 20000)
        client.close()          # the RouteIn gate waits for every other client to leave
        self.task = asyncio.create_task(self.m.run())
        await self.wait(lambda e: e["event"] == "coordinator")
        for i in range(proxies):
            p = await self.add_proxy(f"p{i + 1}")
            self.load_through(p, f"load{i + 1}")

    async def sync_reached(self) -> None:
        await self.wait(lambda e: e["event"] == "awaiting_approval", 90)

    async def finish(self, approve: bool = True) -> None:
        """Approve, reach Complete, then check every acknowledged write on the target."""
        if approve:
            assert self.m.approve() is None
        await self.wait(lambda e: e["event"] == "cutover", 90)
        await self.wait(lambda e: e["event"] == "phase" and e["phase"] == Phase.COMPLETE.value, 30)
        for load in self.loads:
            await load.writes_go_on(20, 30)   # writes flow after the cutover
            await load.finish()
        client = self.target.client()
        for load in self.loads:
            assert load.acked > 100
            assert load.lost(client) == [], load.prefix
        client.close()

    async def close(self) -> None:
        for load in self.loads:
            if not load.stop.is_set():
                await load.finish()
        self.m.stop_requested.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 30)
        for p in self.proxies.values():
            await p.stop()


def run_fleet(source: LocalServer, target: LocalServer, tmp: Path, body: Callable[[Run], Any],
              **opts: Any) -> Run:
    async def main() -> Run:
        r = Run(source, target, tmp, **opts)
        try:
            await body(r)
        finally:
            await r.close()
        return r
    return asyncio.run(main())


def test_a_proxy_killed_in_sync(source, target, tmp_path):
    async def body(r: Run) -> None:
        await r.start()
        await r.sync_reached()
        killed_at = len(r.events)
        r.proxies["p2"].kill()
        await r.wait(lambda e: e["event"] == "proxy_left" and e["proxy"] == "p2", since=killed_at)
        r.loads[1].point_at("127.0.0.1", r.proxies["p1"].port)   # its clients reconnect elsewhere
        # The lost stream's full verify-and-repair, then Sync waits for approval again.
        await r.wait(lambda e: e["event"] == "repair" and "lost its mark stream" in str(e["reason"]),
                     since=killed_at)
        await r.wait(lambda e: e["event"] == "awaiting_approval", 90, since=killed_at)
        await r.finish()
        assert r.m.phase == Phase.COMPLETE
    run_fleet(source, target, tmp_path, body)


def test_a_proxy_rolled_in_sync_leaves_cleanly_and_costs_no_repair(source, target, tmp_path):
    """SIGTERM (a rolling update): the proxy drains its writes and marks, says BYE, exits 0; the
    coordinator demands no verify-and-repair for it."""
    async def body(r: Run) -> None:
        await r.start()
        await r.sync_reached()
        rolled_at = len(r.events)
        p2 = r.proxies["p2"]
        p2.proc.terminate()
        assert await asyncio.wait_for(p2.proc.wait(), 30) == 0
        await r.wait(lambda e: e["event"] == "proxy_left" and e["proxy"] == "p2", since=rolled_at)
        r.loads[1].point_at("127.0.0.1", r.proxies["p1"].port)
        assert r.m.syncer is not None and r.m.syncer.repair_reason is None
        assert not [e for e in r.events[rolled_at:] if e["event"] == "repair"]
        await r.finish()
    run_fleet(source, target, tmp_path, body)


def test_a_proxy_added_in_sync(source, target, tmp_path):
    async def body(r: Run) -> None:
        await r.start()
        await r.sync_reached()
        p3 = await r.add_proxy("p3")
        load = r.load_through(p3, "load3")
        await load.writes_go_on(50, 30)
        await r.finish()
        assert len(r.fleet.members) == 3
    run_fleet(source, target, tmp_path, body)


def test_a_proxy_killed_during_a_cutover_attempt(source, target, tmp_path):
    async def body(r: Run) -> None:
        await r.start()
        await r.sync_reached()
        victim = r.proxies["p2"]

        def kill_on_attempt(e: dict[str, Any]) -> None:
            if e["event"] == "phase" and e["phase"] == Phase.CUTOVER.value and victim.proc.returncode is None:
                victim.kill()
                r.loads[1].point_at("127.0.0.1", r.proxies["p1"].port)
        r.hooks.append(kill_on_attempt)
        await r.finish()
        assert victim.proc.returncode == -signal.SIGKILL
        assert any(e["event"] == "proxy_left" and e["proxy"] == "p2" for e in r.events)
    run_fleet(source, target, tmp_path, body)


class JoinOnFreeze:
    """A ProxyHandle beside the fleet whose FREEZE starts a new proxy process and waits until it has
    joined: the fleet is frozen by then (its own FREEZE took its lock first), so the proxy joins frozen."""

    address = "join-on-freeze"

    def __init__(self) -> None:
        self.run: Run | None = None
        self.joined: ProxyProc | None = None
        self.write: asyncio.Task[Any] | None = None

    async def freeze(self, timeout: float) -> None:
        if self.joined is not None or self.run is None:
            return
        self.joined = await self.run.add_proxy("p3")
        # A write through it now is held (the proxy joined frozen): wait until its stats say so.
        member = next(m for m in self.run.fleet.members.values() if m.proxy_id == "p3")
        client = avalkey.Valkey(port=self.joined.port, socket_timeout=30)
        self.write = asyncio.create_task(client.set("written-while-frozen", "1"))

        async def held() -> bool:
            return bool((await member._admin("GET", "/stats"))["held"] >= 1)

        await wait_for_async("the write through the frozen proxy to be held", held, 10)

    async def prepare_flip(self, upstream: Endpoint) -> None: ...

    async def unprepare(self) -> None: ...

    async def flip(self, upstream: Endpoint) -> None: ...

    async def unfreeze(self) -> None: ...

    async def hold_keys(self, keys: set[tuple[int, bytes]], timeout: float) -> None: ...

    async def release_keys(self) -> None: ...

    async def stop(self) -> None: ...


def test_a_proxy_joins_during_a_freeze(source, target, tmp_path):
    joiner = JoinOnFreeze()

    async def body(r: Run) -> None:
        joiner.run = r
        await r.start()
        await r.sync_reached()
        assert r.m.approve() is None
        joined = await r.wait(lambda e: e["event"] == "proxy_joined" and e["proxy"] == "p3", 90)
        assert joined["frozen"] is True
        r.load_through(r.proxies["p3"], "load3")   # writes held until UNFREEZE, then written to the target
        await r.finish(approve=False)
        assert len(r.fleet.members) == 3
        assert joiner.write is not None and await joiner.write is True     # released after UNFREEZE...
        assert target.client().get("written-while-frozen") == b"1"        # ... to the new authority
    # A process start inside the freeze: the write pause must allow for it.
    run_fleet(source, target, tmp_path, body, extra=[joiner], max_write_pause=10.0)


def test_an_older_coordinators_freeze_and_flip_are_refused(source, target, tmp_path):
    """A proxy that has seen epoch 5 refuses FREEZE and FLIP from epoch 3 (409), stays unfrozen on its
    side, and still takes epoch 5's; a coordinator of epoch 3 cannot take it into its fleet either."""
    token_file = tmp_path / "join.token"
    token_file.write_text(TOKEN)

    async def main() -> None:
        fleet = Fleet(TOKEN, epoch=5)
        await fleet.start(source.endpoint(), lambda _db, _keys: None, lambda _why: None)
        p = await ProxyProc.join(fleet.port, token_file, "p1")
        old: Member | None = None
        try:
            await wait_for_async("the proxy to join", lambda: fleet.members, 30)
            member = next(iter(fleet.members.values()))
            old = Member("old", "p1", member.address, member.admin_base[len("http://"):], TOKEN, epoch=3)
            with pytest.raises(FencedError, match="epoch 3.*seen epoch 5"):
                await old.freeze(1.0)
            with pytest.raises(FencedError):
                await old.flip(target.endpoint())
            c = valkey.Valkey(port=p.port, socket_timeout=5)
            assert c.set("k", "v")                     # not frozen: the old epoch changed nothing
            assert source.client().get("k") == b"v"    # nor flipped: still the source
            await fleet.freeze(2.0)                    # the current epoch is obeyed
            await fleet.unfreeze()

            stale = Fleet(TOKEN, epoch=3, port=fleet.port)   # an old coordinator cannot take it back either
            await fleet.stop()
            await stale.start(source.endpoint(), lambda _db, _keys: None, lambda _why: None)
            try:
                assert await asyncio.wait_for(p.proc.wait(), 30) == 3   # it stops rather than obey
                assert not stale.members
            finally:
                await stale.stop()
            c.close()
        finally:
            if old is not None:
                await old.close_admin()
            await fleet.stop()
            await p.stop()
    asyncio.run(main())


def test_a_coordinator_fenced_by_a_newer_epoch_stops_without_recording_a_phase(source, target, tmp_path):
    """A migration of epoch 3 whose proxy has since seen epoch 5 (a newer coordinator spoke to it): its
    cutover's first instruction is refused, the proxy stays on the source and unfrozen, and the old
    coordinator stops with FencedError instead of failing the migration or trying again."""
    async def body(r: Run) -> None:
        await r.start(proxies=1)
        await r.sync_reached()
        member = next(iter(r.fleet.members.values()))
        newer = Member("newer", "p1", member.address, member.admin_base[len("http://"):], TOKEN, epoch=5)
        await newer.unprepare()                     # harmless, and the proxy has now seen epoch 5
        await newer.close_admin()
        assert r.m.approve() is None
        with pytest.raises(FencedError, match="epoch 3.*seen epoch 5"):
            await asyncio.wait_for(r.task, 60)
        assert r.m.phase == Phase.CUTOVER            # where it stopped; not Failed, not retried
        assert not [e for e in r.events if e["event"] == "cutover_aborted"]
        c = valkey.Valkey(port=r.proxies["p1"].port, socket_timeout=10)
        c.get("any")                                # the proxy still serves (reads; writes refused:
        c.close()                                   # its coordinator is gone)
        await r.loads[0].finish()
        assert r.loads[0].lost(source.client()) == []   # every acknowledged write is on the source
    run_fleet(source, target, tmp_path, body, epoch=3)


def test_a_proxy_that_lost_its_coordinator_fails_closed(source, tmp_path):
    """With its mark stream down the proxy refuses writes (nothing is written upstream) and serves
    reads; once a coordinator is back on that address it rejoins and takes writes again."""
    token_file = tmp_path / "join.token"
    token_file.write_text(TOKEN)

    async def main() -> None:
        got: list[bytes] = []
        fleet = Fleet(TOKEN)
        await fleet.start(source.endpoint(), lambda _db, keys: got.extend(keys), lambda _why: None)
        port = fleet.port
        p = await ProxyProc.join(port, token_file, "p1")
        again: Fleet | None = None
        try:
            await wait_for_async("the proxy to join", lambda: fleet.members, 30)
            c = valkey.Valkey(port=p.port, socket_timeout=10)
            assert c.set("before", "1")
            await fleet.stop()                          # the coordinator is gone

            def refused() -> bool:                      # once the proxy notices the stream's end
                try:
                    c.set("probe", "1")
                except valkey.ConnectionError:          # sent as the stream ended: never acknowledged
                    return False
                except valkey.ResponseError as exc:
                    assert "lost its coordinator" in str(exc) and "nothing was written" in str(exc)
                    return True
                return False

            await wait_for_async("writes to be refused", refused, 10)
            with pytest.raises(valkey.ResponseError, match="TRYAGAIN"):
                c.set("refused", "1")
            with pytest.raises(valkey.ResponseError, match="TRYAGAIN"):
                c.incr("counter")
            assert source.client().get("refused") is None    # refused before anything was sent
            assert c.get("before") == b"1"                    # reads go on

            again = Fleet(TOKEN, port=port)
            await again.start(source.endpoint(), lambda _db, keys: got.extend(keys), lambda _why: None)
            await wait_for_async("the proxy to rejoin", lambda: again.members, 30)
            # READY accepted; the proxy learns it a moment later and takes writes again.
            await wait_for_async("a write after the rejoin", lambda: c.set("after", "1"), 10,
                                 ignore=(valkey.ResponseError,))
            await again.freeze(5.0)                     # the barrier: every mark acknowledged
            assert b"after" in got
            await again.unfreeze()
            c.close()
        finally:
            if again is not None:
                await again.stop()
            await fleet.stop()
            await p.stop()
    asyncio.run(main())


@pytest.mark.parametrize("processes", [1, 2])
def test_migrate_cli_with_only_joined_proxies(source, target, tmp_path, processes):
    """`durablecache migrate --proxies 0 --coordinator-listen` serves clients only through proxies
    that join it: a `durablecache proxy --join` process takes writes, the migration completes, and
    every key written through the proxy is on the target. With `--processes 2` each process on the
    shared port joins as a member of its own."""
    import json
    import subprocess

    with contextlib.closing(source.client()) as client:   # left open, it would hold the gate
        client.mset({f"seed:{i}": i for i in range(500)})
    token = tmp_path / "join.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    coordinator = free_port()
    cli = [sys.executable, "-m", "durablecache.cli"]
    migrate = subprocess.Popen(
        [*cli, "migrate", "--source", source.url(), "--target", target.url(), "--listen", "127.0.0.1:1",
         "--proxies", "0", "--coordinator-listen", f"127.0.0.1:{coordinator}", "--join-token-file", str(token),
         "--gate-settle", "0.3", "--cutover", "manual", "--control", f"127.0.0.1:{free_port()}",
         "--control-token-file", str(tmp_path / "control.token"), "--exit-after-cutover", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listen = free_port()
    proxy = subprocess.Popen(
        [*cli, "proxy", "--join", f"127.0.0.1:{coordinator}", "--join-token-file", str(token), "--admin",
         "127.0.0.1:0", "--listen", f"127.0.0.1:{listen}", "--proxy-id", "only", "--processes", str(processes)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        events: list[dict[str, Any]] = []
        assert migrate.stdout is not None

        def until(pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
            for line in migrate.stdout:        # bounded by the test's timeout and by the process's end
                if line.startswith("{"):
                    events.append(json.loads(line))
                    if pred(events[-1]):
                        return events[-1]
            err = migrate.stderr.read() if migrate.stderr else ""
            raise AssertionError(f"migrate ended first: {events[-5:]} {err}")

        control = until(lambda e: e["event"] == "control")
        members = {"only"} if processes == 1 else {f"only-{i}" for i in range(processes)}
        joined: set[str] = set()
        while joined != members:
            joined.add(until(lambda e: e["event"] == "proxy_joined")["proxy"])
        c = valkey.Valkey(port=listen, socket_timeout=10)
        for i in range(200):
            assert c.set(f"via-proxy:{i}", i)
        if not any(e["event"] == "awaiting_approval" for e in events):   # it may come between two joins
            until(lambda e: e["event"] == "awaiting_approval")
        res = subprocess.run([*cli, "control", "approve", "--control", control["address"], "--control-token-file",
                              str(tmp_path / "control.token")], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        until(lambda e: e["event"] == "phase" and e["phase"] == "Complete")
        assert migrate.wait(60) == 0
        c.close()
        with contextlib.closing(target.client()) as t:
            assert t.dbsize() == 700
            assert t.get("via-proxy:199") == b"199"
    finally:
        for p in (proxy, migrate):
            if p.poll() is None:
                p.terminate()
                p.wait(10)


def test_migrate_refuses_no_proxies_without_a_coordinator_address(source, target):
    import subprocess
    res = subprocess.run([sys.executable, "-m", "durablecache.cli", "migrate", "--source", source.url(), "--target",
                          target.url(), "--listen", "127.0.0.1:1", "--proxies", "0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "--proxies 0 needs --coordinator-listen" in res.stderr
