"""What losing a proxy costs, side by side in one run (not a test; docs/ha.md, "What a lost proxy costs").

One source and one target valkey-server, N small strings, a coordinator (Migration with a Fleet,
manual cutover) and three `durablecache proxy --join` processes, a write load through each. Once in
Sync and ready (the planned verify pass done), it measures:

1. roll: SIGTERM to one proxy (a rolling update). It drains, says BYE, leaves: no repair. Time until
   it has left the fleet, and whether the migration stayed cutover-ready.
2. kill: SIGKILL to another. Its mark stream ends without BYE: the coordinator demands a full
   verify-and-repair. Time until the migration is cutover-ready again (awaiting approval).
3. For scale, the planned verify pass after the copy (the same full verify) in the same run.
4. The alternative to streaming: marks acknowledged before each reply. Sequential SET latency through
   one proxy, streamed vs acknowledged, alternating rounds in one process.

Then it approves, cuts over, and checks that no acknowledged write is missing on the target.
Usage: python bench/fleet.py [--keys 1000000] [--latency-writes 5000]
"""

from __future__ import annotations

import os
import sys

# bench/copy.py would shadow the standard library's `copy`: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import uvloop  # noqa: E402
import valkey  # noqa: E402

from durablecache.commands.migrate import proxy_starter  # noqa: E402
from durablecache.fleet import Fleet  # noqa: E402
from durablecache.migration import Migration  # noqa: E402
from durablecache.options import MigrationOptions  # noqa: E402
from durablecache.ports import free_port  # noqa: E402
from durablecache.proxy import Proxy  # noqa: E402
from durablecache.proxy.marks import MarkServer, RemoteMarks  # noqa: E402
from durablecache.testing.localvalkey import LocalServer  # noqa: E402
from durablecache.testing.workload import Workload  # noqa: E402

TOKEN = "bench-fleet"


def load(server: LocalServer, n: int) -> None:
    client = server.client()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"key:{i}", f"value-{i}-" + "x" * (i % 48))
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()
    client.close()


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self.changed = asyncio.Event()

    def emit(self, e: dict[str, Any]) -> None:
        self.seen.append((time.monotonic(), e))
        self.changed.set()

    async def wait(self, pred: Any, since: int = 0, timeout: float = 1800.0) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            for t, e in self.seen[since:]:
                if pred(e):
                    return t, e
            if time.monotonic() > deadline:
                raise TimeoutError(f"not seen; last events: {[e for _, e in self.seen[-5:]]}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 5.0)


async def join(port: int, token_file: Path, name: str) -> tuple[asyncio.subprocess.Process, int]:
    listen = free_port()
    with open(token_file.parent / f"{name}.log", "ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "durablecache.cli", "--log-json", "proxy", "--join", f"127.0.0.1:{port}",
            "--join-token-file", str(token_file), "--admin", "127.0.0.1:0", "--listen", f"127.0.0.1:{listen}",
            "--proxy-id", name, stdout=asyncio.subprocess.DEVNULL, stderr=err)
    return proc, listen


async def losses(keys: int) -> dict[str, Any]:
    source, target = LocalServer().start(), LocalServer(engine="valkey9").start()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    token_file = work / "join.token"
    token_file.write_text(TOKEN)
    procs: dict[str, asyncio.subprocess.Process] = {}
    loads: list[Workload] = []
    try:
        t = time.monotonic()
        load(source, keys)
        print(f"loaded {keys} keys in {time.monotonic() - t:.1f}s", flush=True)
        ev = Events()
        fleet = Fleet(TOKEN, emit=ev.emit)
        starter, _ = proxy_starter("127.0.0.1", 0, "inprocess", ev.emit, fleet=fleet, spawn=False)
        # The gate's settle period lets all three join and write before the copy, so that the planned
        # verify pass runs under the same load as the repair after the kill.
        opts = MigrationOptions(cutover="manual", gate_settle=15.0, gate_timeout=120, rollback_window=1.0)
        m = Migration(source.endpoint(), target.endpoint(), opts, starter, emit=ev.emit)
        task = asyncio.create_task(m.run())
        await ev.wait(lambda e: e["event"] == "coordinator")
        ports = {}
        for name in ("p1", "p2", "p3"):
            procs[name], ports[name] = await join(fleet.port, token_file, name)
        for name in ("p1", "p2", "p3"):
            await ev.wait(lambda e, n=name: e["event"] == "proxy_joined" and e["proxy"] == n, timeout=60)
            w = Workload("127.0.0.1", ports[name], writers=2, rate=500, prefix=f"load-{name}")
            w.start()
            loads.append(w)
        t_verify, _ = await ev.wait(lambda e: e["event"] == "repair" and e.get("planned"))
        t_ready, _ = await ev.wait(lambda e: e["event"] == "awaiting_approval")
        out: dict[str, Any] = {"keys": keys, "planned_verify_s": round(t_ready - t_verify, 2)}
        p1_port = loads[0].address[1]

        since = len(ev.seen)
        t0 = time.monotonic()
        procs["p3"].send_signal(signal.SIGTERM)
        code = await procs["p3"].wait()
        t_left, _ = await ev.wait(lambda e: e["event"] == "proxy_left" and e["proxy"] == "p3", since)
        loads[2].point_at("127.0.0.1", p1_port)
        repairs = [e for _, e in ev.seen[since:] if e["event"] == "repair"]
        assert m.syncer is not None
        out["roll"] = {"exit_code": code, "left_s": round(t_left - t0, 3), "repairs": len(repairs),
                       "still_ready": m.syncer.repair_reason is None}

        since = len(ev.seen)
        t0 = time.monotonic()
        procs["p2"].send_signal(signal.SIGKILL)
        await procs["p2"].wait()
        await ev.wait(lambda e: e["event"] == "proxy_left" and e["proxy"] == "p2", since)
        loads[1].point_at("127.0.0.1", p1_port)
        t_again, _ = await ev.wait(lambda e: e["event"] == "awaiting_approval", since)
        out["kill"] = {"ready_again_s": round(t_again - t0, 2)}

        assert m.approve() is None
        _, cut = await ev.wait(lambda e: e["event"] == "cutover", since)
        out["cutover_pause_ms"] = cut["pause_ms"]
        await ev.wait(lambda e: e["event"] == "phase" and e["phase"] == "Complete", since)
        for w in loads:
            await w.finish()
        client = target.client()
        out["acknowledged"] = sum(w.acked for w in loads)
        out["lost"] = sum(len(w.lost(client)) for w in loads)
        client.close()
        m.stop_requested.set()
        await asyncio.wait_for(task, 60)
        return out
    finally:
        for w in loads:
            if not w.stop.is_set():
                await w.finish()
        for p in procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()
        source.stop()
        target.stop()


def latency(writes: int, rounds: int) -> dict[str, Any]:
    """Sequential SETs through one proxy whose marks go over TCP to a MarkServer (both on a loop in
    a thread, as `durablecache proxy --join`): streamed vs acknowledged before the reply."""
    source = LocalServer().start()
    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    async def setup() -> tuple[Proxy, MarkServer, RemoteMarks]:
        server = MarkServer(lambda _db, _keys: None, TOKEN)
        await server.start()
        remote = RemoteMarks("127.0.0.1", server.port, TOKEN)
        await remote.connect()
        proxy = Proxy(source.endpoint(), on_marks=remote)
        await proxy.start()
        return proxy, server, remote

    proxy, server, remote = run(setup())
    client = valkey.Valkey(port=proxy.port)
    results: dict[str, list[float]] = {"streamed": [], "acknowledged": []}
    try:
        for _ in range(rounds):
            for mode in ("streamed", "acknowledged"):
                limit = 0 if mode == "acknowledged" else 8 << 20
                run(_set_limit(proxy, limit))
                samples = []
                for i in range(writes):
                    t0 = time.perf_counter()
                    client.set(f"lat:{i}", "v")
                    samples.append(time.perf_counter() - t0)
                results[mode].extend(samples)
    finally:
        client.close()
        run(proxy.stop())
        run(remote.close())
        run(server.stop())
        loop.call_soon_threadsafe(loop.stop)
        source.stop()
    out: dict[str, Any] = {}
    for mode, samples in results.items():
        samples.sort()
        out[mode] = {"p50_us": round(statistics.median(samples) * 1e6, 1),
                     "p99_us": round(samples[int(len(samples) * 0.99)] * 1e6, 1)}
    out["p50_ratio"] = round(out["acknowledged"]["p50_us"] / out["streamed"]["p50_us"], 2)
    return out


async def _set_limit(proxy: Proxy, limit: int) -> None:
    proxy.delivery.mark_stream_bytes = limit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--latency-writes", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(latency(args.latency_writes, args.rounds), flush=True)
    print(uvloop.run(losses(args.keys)), flush=True)


if __name__ == "__main__":
    main()
