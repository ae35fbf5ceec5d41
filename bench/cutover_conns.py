"""The cutover's write pause against the number of idle client connections (not a test).

For each run: two fresh local valkey-servers (``--maxclients`` raised), a seeded keyspace, writers in a
process of their own (durablecache.testing.workload.Workload, which also counts lost acknowledged writes), N idle
client connections in another process (each connected through the proxy and sent one PING, then left
open), a migration with an in-process proxy approved by hand; the run reports the `cutover` event's
pause_ms (FREEZE to UNFREEZE) and freeze_ms.

Side by side with another tree (the code before a change): ``--compare DIR`` runs every cell once with
this tree's ``operator/`` and once with ``DIR`` (each in a fresh Python process, PYTHONPATH pointing at
the tree), the order alternating from round to round, and prints both in one table.

Usage: python bench/cutover_conns.py [--conns 10,1000,5000] [--rounds 3] [--compare ../base/operator]
"""

from __future__ import annotations

import os
import sys

# bench/ holds copy.py, which would shadow the standard library's `copy`: leave bench/ off the path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import valkey  # noqa: E402

from durablecache.commands._common import run_async  # noqa: E402
from durablecache.migration import Migration, MigrationOptions  # noqa: E402
from durablecache.proxyhandles import local_proxies  # noqa: E402
from durablecache.testing.localvalkey import LocalServer  # noqa: E402
from durablecache.testing.workload import Workload, seed  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MAXCLIENTS = "20000"


def raise_nofile() -> None:
    """Each idle client costs the proxy process three descriptors (client, source, prepared target)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def writers_process(port_q: Any, stop: Any, result_q: Any, writers: int, rate: float) -> None:
    async def main() -> None:
        port = port_q.get()
        load = Workload("127.0.0.1", port, writers=writers, rate=rate, prefix="cw")
        load.start()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await load.finish()
        client = valkey.Valkey(port=port_q.get())
        result_q.put({"acked": load.acked, "lost": len(load.lost(client))})

    asyncio.run(main())


def idle_process(port_q: Any, ready: Any, stop: Any, n: int) -> None:
    """``n`` client connections through the proxy, each sends one PING and then stays idle."""
    raise_nofile()

    async def one(port: int, gate: asyncio.Semaphore) -> asyncio.StreamWriter:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"*1\r\n$4\r\nPING\r\n")
            line = await asyncio.wait_for(reader.readline(), 30)
            if line != b"+PONG\r\n":
                raise RuntimeError(f"PING answered {line!r}")
            return writer

    async def main() -> None:
        port = port_q.get()
        gate = asyncio.Semaphore(200)
        writers = await asyncio.gather(*(one(port, gate) for _ in range(n)))
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for w in writers:
            w.close()

    asyncio.run(main())


async def one_run(conns: int, writers: int, rate: float, keys: int) -> dict[str, Any]:
    raise_nofile()
    extra = ["--maxclients", MAXCLIENTS]
    source, target = LocalServer(extra=extra).start(), LocalServer(extra=extra).start()
    ctx = multiprocessing.get_context("spawn")
    port_q, idle_q, result_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    stop, ready = ctx.Event(), ctx.Event()
    loader = ctx.Process(target=writers_process, args=(port_q, stop, result_q, writers, rate / writers))
    idler = ctx.Process(target=idle_process, args=(idle_q, ready, stop, conns))
    try:
        c = source.client()
        seed(c, keys)
        c.close()
        loader.start()
        idler.start()
        in_sync, cut = asyncio.Event(), asyncio.Event()
        events: dict[str, Any] = {}

        def emit(e: dict[str, Any]) -> None:
            events.setdefault(e["event"], e)
            if e["event"] == "proxies":
                port = int(e["addresses"][0].rsplit(":", 1)[1])
                port_q.put(port)
                idle_q.put(port)
            if e["event"] == "phase" and e["phase"] == "Sync":
                in_sync.set()
            if e["event"] in ("cutover", "failed"):
                cut.set()

        opts = MigrationOptions(cutover="manual", gate_settle=0.3, rollback_window=600, watch_interval=1.0)
        m = Migration(source.endpoint(), target.endpoint(), opts, local_proxies("127.0.0.1", 0), emit=emit)
        task = asyncio.create_task(m.run())
        await asyncio.wait_for(in_sync.wait(), 120)
        deadline = time.monotonic() + 120
        while not ready.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError("idle connections not ready in 120 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)        # the writers run at their rate for a while before approval
        m.approved.set()
        await asyncio.wait_for(cut.wait(), 120)
        if "cutover" not in events:
            raise RuntimeError(f"no cutover: {events.get('failed')}")
        await asyncio.sleep(0.5)
        stop.set()
        port_q.put(target.port)
        result = await asyncio.to_thread(result_q.get, True, 60)
        m.stop_requested.set()
        await asyncio.wait_for(task, 60)
        aborted = events.get("cutover_aborted")
        return {"conns": conns, "pause_ms": events["cutover"]["pause_ms"],
                "freeze_ms": events["cutover"]["freeze_ms"], "steps_ms": events["cutover"].get("steps_ms", {}),
                "attempt": events["cutover"]["attempt"],
                "first_abort": aborted["reason"] if aborted else None,
                "acked": result["acked"], "lost": result["lost"]}
    finally:
        stop.set()
        for proc in (loader, idler):
            proc.join(15)
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
        source.stop()
        target.stop()


def run_in(tree: str, conns: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run in a fresh process with ``tree`` (an operator/ directory) first on the path."""
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, os.path.join(HERE, "cutover_conns.py"), "--one", str(conns),
           "--writers", str(args.writers), "--rate", str(args.rate), "--keys", str(args.keys)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"run failed ({tree}, {conns}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", default="10,1000,5000", help="idle client connections, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=2000, help="total writes/s of the writers")
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--compare", default="", help="another tree's operator/ directory, run side by side")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        # as `durablecache migrate` runs: uvloop where installed, the collector tuned (commands/_common.py)
        print(json.dumps(run_async(one_run(args.one, args.writers, args.rate, args.keys))), flush=True)
        return
    this = os.path.join(os.path.dirname(HERE), "operator")
    trees = {"this": this, **({"compare": os.path.abspath(args.compare)} if args.compare else {})}
    sizes = [int(x) for x in args.conns.split(",")]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        order = list(trees.items()) if rnd % 2 == 0 else list(reversed(trees.items()))
        for n in sizes:
            for label, tree in order:
                r = run_in(tree, n, args)
                results.setdefault((label, n), []).append(r)
                print(f"round {rnd + 1} {label:8} {n:>6} conns: pause {r['pause_ms']:.2f} ms "
                      f"(steps {r.get('steps_ms')}), attempt {r['attempt']}, lost {r['lost']}", flush=True)
    print(f"\nwrite pause (ms), median of {args.rounds} rounds [min-max]; {args.writers} writers at "
          f"{args.rate:,.0f} writes/s")
    print(f"{'idle conns':>10} " + " ".join(f"{label + ' (' + tree + ')':>40}" for label, tree in trees.items()))
    for n in sizes:
        cells = []
        for label in trees:
            ps = [r["pause_ms"] for r in results[(label, n)]]
            cells.append(f"{statistics.median(ps):8.2f} [{min(ps):.2f}-{max(ps):.2f}]")
        print(f"{n:>10} " + " ".join(f"{c:>40}" for c in cells))
    lost = sum(r["lost"] for rs in results.values() for r in rs)
    acked = sum(r["acked"] for rs in results.values() for r in rs)
    print(f"acknowledged writes: {acked:,}, lost: {lost}")


if __name__ == "__main__":
    main()
