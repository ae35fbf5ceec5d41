"""Cutover and resync benchmark (not a test).

For each of N runs: two fresh local valkey-servers, a seeded keyspace, a write load of ~5k writes/s
from a separate process (so the load does not share this process's event loop with the proxy), a
full migration with an in-process proxy; records the cutover write pause and, during Sync, the
resync lag: the time from a write's acknowledgement through the proxy until the target has it.
Then a hot big key: a large sorted set under constant ZINCRBY from one client in a process of its own:
its resync lag (a probe ZINCRBY every 20 ms on a member of that key, acknowledged through the proxy,
until the target has its score; probes from the writer's process, during Sync), and
whether the cutover succeeds while it is being written, with the default settings — reported as the
key pause (what that key's writer waits: a key-scoped hold first if the key's copy does not fit the
write pause, then the global freeze) and, separately, the global write pause.
The migration (proxy and syncer) runs on the event loop `durablecache migrate` runs on (uvloop where
installed, the collector tuned: commands/_common.run_async).
Usage: python bench/cutover.py [--runs 5] [--rate 5000] [--hot-members 1000000] [--hot-only] [--hot-runs 3]
Before/after a change, side by side: run this file with PYTHONPATH pointing at each tree's operator/.
"""

from __future__ import annotations

import os
import sys

# bench/ holds copy.py, which would shadow the standard library's `copy`: leave bench/ off the path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import valkey  # noqa: E402
import valkey.asyncio as avalkey  # noqa: E402

from durablecache.commands._common import run_async  # noqa: E402
from durablecache.migration import Migration, MigrationOptions  # noqa: E402
from durablecache.proxyhandles import local_proxies  # noqa: E402
from durablecache.testing.localvalkey import LocalServer  # noqa: E402
from durablecache.testing.workload import Workload, seed  # noqa: E402
from durablecache.topology import discover  # noqa: E402
from durablecache.verify import Verifier  # noqa: E402


def load_process(port_q: Any, stop: Any, result_q: Any, writers: int, rate: float, prefix: str) -> None:
    async def main() -> None:
        port = port_q.get()
        load = Workload("127.0.0.1", port, writers=writers, rate=rate, prefix=prefix)
        load.start()
        t0 = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t0
        await load.finish()
        client = valkey.Valkey(port=port_q.get())
        result_q.put({"acked": load.acked, "rate": load.acked / elapsed, "lost": len(load.lost(client)),
                      "max_latency_ms": load.max_latency_ms})

    asyncio.run(main())


async def probe_lag(proxy_port: int, target: LocalServer, samples: int) -> list[float]:
    app = avalkey.Valkey(port=proxy_port)
    direct = avalkey.Valkey(port=target.port)
    lags = []
    for i in range(samples):
        key = f"lag-probe:{i}"
        await app.set(key, i)
        t0 = time.perf_counter()
        for _ in range(5000):
            if await direct.exists(key):
                break
            await asyncio.sleep(0.0005)
        lags.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.01)
    await app.aclose()
    await direct.aclose()
    return lags


async def one_run(keys: int, writers: int, rate: float, procs: int) -> dict[str, Any]:
    """`procs` load processes with `writers` writers each, every writer at `rate` writes/s."""
    source, target = LocalServer().start(), LocalServer().start()
    ctx = multiprocessing.get_context("spawn")
    port_q, result_q, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    loaders = [ctx.Process(target=load_process, args=(port_q, stop, result_q, writers, rate, f"load{i}"))
               for i in range(procs)]
    try:
        c = source.client()
        seed(c, keys)
        c.close()
        for proc in loaders:
            proc.start()
        in_sync, cut = asyncio.Event(), asyncio.Event()
        events: dict[str, Any] = {}
        proxy_port = 0

        def emit(e: dict[str, Any]) -> None:
            nonlocal proxy_port
            events.setdefault(e["event"], e)
            if e["event"] == "proxies":
                proxy_port = int(e["addresses"][0].rsplit(":", 1)[1])
                for _ in loaders:
                    port_q.put(proxy_port)
            if e["event"] == "phase" and e["phase"] == "Sync":
                in_sync.set()
            if e["event"] == "cutover":
                cut.set()

        opts = MigrationOptions(cutover="manual", gate_settle=0.3, rollback_window=600)
        m = Migration(source.endpoint(), target.endpoint(), opts, local_proxies("127.0.0.1", 0), emit=emit)
        task = asyncio.create_task(m.run())
        await asyncio.wait_for(in_sync.wait(), 120)
        await asyncio.sleep(1.0)
        lags = await probe_lag(proxy_port, target, 50)
        m.approved.set()
        await asyncio.wait_for(cut.wait(), 120)
        await asyncio.sleep(0.5)
        stop.set()
        for _ in loaders:
            port_q.put(target.port)
        results = [await asyncio.to_thread(result_q.get, True, 60) for _ in loaders]
        m.stop_requested.set()
        await asyncio.wait_for(task, 30)
        return {"pause_ms": events["cutover"]["pause_ms"], "lag_ms": lags,
                "acked": sum(r["acked"] for r in results), "rate": sum(r["rate"] for r in results),
                "lost": sum(r["lost"] for r in results), "max_latency_ms": max(r["max_latency_ms"] for r in results)}
    finally:
        for proc in loaders:
            if proc.is_alive():
                proc.terminate()
            proc.join(10)
        source.stop()
        target.stop()


class HotProbes:
    """Resync lag of the hot key: ZINCRBY on probe members (through the proxy) every ``every`` seconds,
    one poller asking the target for every outstanding probe's score each millisecond."""

    def __init__(self, proxy_port: int, target_port: int, every: float = 0.02):
        self.app = avalkey.Valkey(port=proxy_port, socket_timeout=60)
        self.direct = avalkey.Valkey(port=target_port)
        self.every = every
        self.outstanding: dict[str, tuple[float, float]] = {}    # member -> (score acked, when)
        self.lags: list[float] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        poller = asyncio.create_task(self._poll())
        n = 0
        while not self.stop.is_set():
            member = f"probe-{n}"
            try:
                score = await self.app.zincrby("leaderboard", 1, member)
            except valkey.exceptions.ConnectionError:
                break        # the migration ended (a failed cutover stops the proxy)
            self.outstanding[member] = (float(score), time.perf_counter())
            n += 1
            await asyncio.sleep(self.every)
        for _ in range(60_000):      # bounded: the last probes land (or 60 s pass)
            if not self.outstanding:
                break
            await asyncio.sleep(0.001)
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        await self.app.aclose()
        await self.direct.aclose()

    async def _poll(self) -> None:
        while True:
            if self.outstanding:
                members = list(self.outstanding)
                scores = await self.direct.zmscore("leaderboard", members)
                now = time.perf_counter()
                for member, got in zip(members, scores):
                    want, at = self.outstanding[member]
                    if got is not None and got >= want:
                        self.lags.append((now - at) * 1000)
                        del self.outstanding[member]
            await asyncio.sleep(0.001)


def hot_process(ports: Any, approved: Any, stop: Any, result_q: Any, kind: str, members: int,
                timeout: float) -> None:
    """The hot key's writer (and, for a sorted set, the lag probes until approval), in a process of its
    own, as an application would be: not on the event loop of the proxy and the syncer."""
    async def main() -> None:
        proxy_port, target_port = ports.get()
        # A client timeout above the key pause's bound (valkey-py's default, 5 s, equals max_key_pause's).
        app = avalkey.Valkey(port=proxy_port, socket_timeout=timeout)
        probes = HotProbes(proxy_port, target_port)
        probing = asyncio.create_task(probes.run() if kind == "zset" else probes.stop.wait())
        writes = before = 0
        max_latency = 0.0
        while not stop.is_set():
            if not before and approved.is_set():
                before = writes
                probes.stop.set()
            t0 = time.monotonic()
            try:
                writes += await hot_write(app, kind, writes, members)
            except valkey.exceptions.ConnectionError:
                break       # a migration that failed stops its proxy
            if before:
                max_latency = max(max_latency, time.monotonic() - t0)
            if writes % 256 == 0:
                await asyncio.sleep(0)      # let the probes run
        probes.stop.set()
        await probing
        await app.aclose()
        result_q.put({"writes": before or writes, "writes_after": writes - before, "lags": probes.lags,
                      "unresolved": len(probes.outstanding), "writer_max_ms": max_latency * 1000})

    asyncio.run(main())


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * share) - 1)] if ordered else float("nan")


HOT_KEYS = {"zset": b"leaderboard", "list": b"queue", "stream": b"events"}


def seed_hot(c: valkey.Valkey, kind: str, members: int) -> None:
    for i in range(0, members, 10_000):
        upto = min(i + 10_000, members)
        if kind == "zset":
            c.zadd("leaderboard", {f"player-{j}": j for j in range(i, upto)})
        elif kind == "list":
            c.rpush("queue", *[f"item-{j}" for j in range(i, upto)])
        else:
            with c.pipeline(transaction=False) as p:
                for j in range(i, upto):
                    p.xadd("events", {"n": j})
                p.execute()


async def hot_write(app: avalkey.Valkey, kind: str, n: int, members: int) -> int:
    """One round of the hot writer; returns the writes it made. A queue: push one, pop one; a stream:
    XADD trimmed to its size (MAXLEN)."""
    if kind == "zset":
        await app.zincrby("leaderboard", 1, f"player-{n % members}")
        return 1
    if kind == "list":
        await app.lpush("queue", f"new-{n}")
        await app.rpop("queue")
        return 2
    await app.xadd("events", {"n": n}, maxlen=members, approximate=False)
    return 1


async def hot_key(members: int, seconds: float, max_key_pause: float = 5.0, kind: str = "zset") -> dict[str, Any]:
    """One big key (a sorted set under ZINCRBY, a list as a queue, a stream under XADD MAXLEN) written as
    fast as one client can, through the proxy, during Sync; probes of the resync lag for a sorted set."""
    source, target = LocalServer().start(), LocalServer().start()
    ctx = multiprocessing.get_context("spawn")
    ports, result_q, approved, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    writer = ctx.Process(target=hot_process, args=(ports, approved, stop, result_q, kind, members, max_key_pause + 30))
    try:
        c = source.client()
        seed_hot(c, kind, members)
        c.close()
        writer.start()
        in_sync, cut = asyncio.Event(), asyncio.Event()
        proxy_port = 0
        outcome: dict[str, Any] = {"aborted": 0}

        def emit(e: dict[str, Any]) -> None:
            nonlocal proxy_port
            if e["event"] == "cutover_aborted":
                outcome["aborted"] += 1
            if e["event"] == "cutover":
                outcome["pause_ms"] = e["pause_ms"]
                outcome["key_pause_ms"] = e.get("key_pause_ms", 0.0)
                outcome["held_keys"] = e.get("held_keys", 0)
                outcome["while_writing"] = not stop.is_set()
                cut.set()
            if e["event"] == "proxies":
                proxy_port = int(e["addresses"][0].rsplit(":", 1)[1])
            if e["event"] == "awaiting_approval":   # caught up, and the verify pass after the copy done
                in_sync.set()

        opts = MigrationOptions(cutover="manual", gate_settle=0.3, cutover_attempts=5, max_key_pause=max_key_pause,
                                rollback_window=600)
        m = Migration(source.endpoint(), target.endpoint(), opts, local_proxies("127.0.0.1", 0), emit=emit)
        task = asyncio.create_task(m.run())
        await asyncio.wait_for(in_sync.wait(), 300)
        assert m.syncer
        ports.put((proxy_port, target.port))
        before, members_before = m.syncer.stats.copied, getattr(m.syncer.stats, "members", 0)
        await asyncio.sleep(seconds)
        copies = m.syncer.stats.copied - before
        member_copies = getattr(m.syncer.stats, "members", 0) - members_before
        # Cut over while the hot key keeps being written: does the drain fit the write-pause budget?
        approved.set()
        m.approved.set()
        t2 = time.monotonic()
        await asyncio.wait([task, asyncio.create_task(cut.wait())], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        outcome["cutover_after_s"] = time.monotonic() - t2
        outcome["copy_ms"] = m.syncer.expected_copy((0, HOT_KEYS[kind])) * 1000
        await asyncio.sleep(0.3)        # writes go on after the cutover, then stop
        stop.set()
        load = await asyncio.to_thread(result_q.get, True, 120)
        t1 = time.monotonic()
        drained = await m.syncer.drain(60) if not task.done() else False
        catch_up = time.monotonic() - t1
        outcome["equal"] = (await Verifier(await discover(source.endpoint()), await discover(target.endpoint()))
                            .run()).equal
        m.stop_requested.set()
        try:
            await asyncio.wait_for(task, 30)
        except Exception as exc:  # noqa: BLE001 - a failed cutover is a result here, not an error
            outcome["error"] = str(exc)
        return {"writes": load["writes"], "writes_per_s": load["writes"] / seconds, "full_copies": copies,
                "member_copies_per_s": member_copies / seconds, "lag_ms": load["lags"],
                "lag_unresolved": load["unresolved"], "writer_max_ms": load["writer_max_ms"],
                "copies_per_s": copies / seconds, "drained": drained, "catch_up_s": catch_up, **outcome}
    finally:
        stop.set()
        if writer.is_alive():
            writer.join(10)
        if writer.is_alive():
            writer.terminate()
        source.stop()
        target.stop()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--writers", type=int, default=8, help="writers per load process")
    ap.add_argument("--load-procs", type=int, default=2, help="load processes (one Python process tops out "
                                                              "near 4,000 writes/s here)")
    ap.add_argument("--rate", type=float, default=5000, help="total writes/s of all load processes")
    ap.add_argument("--hot-members", type=int, default=1_000_000)
    ap.add_argument("--hot-seconds", type=float, default=10.0, help="seconds of hot writes before approval")
    ap.add_argument("--hot-only", action="store_true", help="only the hot big key")
    ap.add_argument("--hot-runs", type=int, default=1, help="runs of the hot big key (each with fresh servers)")
    ap.add_argument("--hot-type", choices=sorted(HOT_KEYS), default="zset",
                    help="the hot key: a sorted set (ZINCRBY), a list (LPUSH+RPOP), a stream (XADD MAXLEN)")
    ap.add_argument("--max-key-pause", type=float, default=5.0, help="seconds (MigrationOptions.max_key_pause)")
    args = ap.parse_args()
    if not args.hot_only:
        await general(args)
    await hot(args)


async def general(args: argparse.Namespace) -> None:
    per_writer = args.rate / (args.writers * args.load_procs)
    runs = [await one_run(args.keys, args.writers, per_writer, args.load_procs) for _ in range(args.runs)]
    pauses = sorted(r["pause_ms"] for r in runs)
    lags = sorted(x for r in runs for x in r["lag_ms"])
    print(f"load: {statistics.mean(r['rate'] for r in runs):,.0f} writes/s acknowledged through the proxy "
          f"(target {args.rate:,.0f}), lost writes: {sum(r['lost'] for r in runs)}")
    print(f"cutover write pause over {len(runs)} runs: p50 {statistics.median(pauses):.1f} ms, "
          f"max {max(pauses):.1f} ms (target < 100 ms)")
    print(f"slowest acknowledged write seen by a client: {max(r['max_latency_ms'] for r in runs):.1f} ms")
    print(f"resync lag (ack via proxy -> visible on target), {len(lags)} probes: "
          f"p50 {statistics.median(lags):.1f} ms, p99 {lags[int(len(lags) * 0.99) - 1]:.1f} ms, max {max(lags):.1f} ms")


async def hot(args: argparse.Namespace) -> None:
    pooled: list[float] = []
    for run in range(args.hot_runs):
        if args.hot_runs > 1:
            print(f"hot big key, run {run + 1} of {args.hot_runs}:")
        pooled += await hot_once(args)
    if args.hot_runs > 1 and pooled:
        print(f"hot big zset resync lag, all {args.hot_runs} runs' {len(pooled)} probes together: "
              f"p50 {statistics.median(pooled):.1f} ms, p95 {percentile(pooled, 0.95):.1f} ms, "
              f"p99 {percentile(pooled, 0.99):.1f} ms, max {max(pooled):.1f} ms")


async def hot_once(args: argparse.Namespace) -> list[float]:
    """One run of the hot big key; returns its resync lags (ms)."""
    hot = await hot_key(args.hot_members, args.hot_seconds, args.max_key_pause, args.hot_type)
    lags: list[float] = hot["lag_ms"]
    if lags:
        print(f"hot big zset resync lag (ZINCRBY acked via proxy -> its score on the target), {len(lags)} probes "
              f"({hot['lag_unresolved']} never seen): p50 {statistics.median(lags):.1f} ms, "
              f"p95 {percentile(lags, 0.95):.1f} ms, p99 {percentile(lags, 0.99):.1f} ms, max {max(lags):.1f} ms")
    print(f"hot big key ({args.hot_members:,}-element {args.hot_type}, written as fast as one client goes): "
          f"{hot['writes_per_s']:,.0f} writes/s caused {hot['copies_per_s']:.1f} whole-key copies/s and "
          f"{hot['member_copies_per_s']:,.0f} member copies/s "
          f"(marks coalesced {hot['writes'] / max(hot['full_copies'], 1):,.0f}:1; last full copy "
          f"{hot.get('copy_ms', 0):.0f} ms); "
          f"backlog drained {hot['catch_up_s']:.2f}s after writes stopped: {hot['drained']}")
    # Without a key-scoped hold, the hot key's writer waits for the global pause like everyone else.
    key_pause = hot.get("key_pause_ms", 0.0) if hot.get("held_keys") else hot.get("pause_ms", 0.0)
    if "pause_ms" in hot and hot["while_writing"]:
        print(f"  cutover under that load: succeeded WHILE writing, {hot['cutover_after_s']:.2f}s after approval, "
              f"after {hot['aborted']} aborted attempts; {hot['held_keys']} hot key(s) held first: key pause "
              f"{key_pause:.1f} ms (the hot writer's slowest write: {hot['writer_max_ms']:.1f} ms), "
              f"then global write pause {hot['pause_ms']:.1f} ms; source and target equal afterwards: {hot['equal']}")
    elif "pause_ms" in hot:
        print(f"  cutover under that load: NOT reached in 30 s of writes (the key never stayed clean); it "
              f"succeeded only after the writes stopped, pause {hot['pause_ms']:.1f} ms; equal: {hot['equal']}")
    else:
        print(f"  cutover under that load: FAILED after {hot['aborted']} aborted attempts ({hot.get('error')})")
    return lags


if __name__ == "__main__":
    run_async(main())
