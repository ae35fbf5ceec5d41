"""durablecache demo: a complete live migration between two local Valkey servers it starts itself."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from ..errors import DurableCacheError
from ..migration import Migration, MigrationOptions
from ..proxyhandles import local_proxies
from ..testing.localvalkey import LocalCluster, LocalServer
from ..testing.workload import Workload, seed
from ..topology import discover
from ..verify import Verifier
from ._common import run_async

NAME = "demo"
HELP = "run a full live migration between local Valkey servers under write load and print a report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", type=int, default=100_000, help="sample keys to load (default %(default)s)")
    p.add_argument("--writers", type=int, default=4, help="concurrent writers (default %(default)s)")
    p.add_argument("--rate", type=float, default=500, help="writes/s per writer (default %(default)s)")
    p.add_argument("--cluster", action="store_true", help="use 3-primary clusters instead of single servers")


def run(args: argparse.Namespace) -> int:
    print("starting a valkey-server 8.1 source and a valkey-server 9.1 target (the engine of every durable "
          "cluster)" + (", 3-primary clusters" if args.cluster else "") + " ...", flush=True)
    servers: list[Any] = []
    try:
        for engine in ("valkey8", "valkey9"):
            servers.append(LocalCluster(primaries=3, engine=engine).start() if args.cluster
                           else LocalServer(engine=engine).start())
        source, target = servers
        client = source.cluster_client() if args.cluster else source.client()
        t0 = time.monotonic()
        seed(client, args.keys)
        client.close()  # the gate would rightly count this connection as an application
        print(f"loaded {args.keys} sample keys into the source in {time.monotonic() - t0:.1f}s", flush=True)
        report = run_async(demo(args, source, target))
    finally:
        for s in servers:
            s.stop()
    print()
    for label, value in report.items():
        print(f"  {label:<34} {value}")
    return 0 if report["writes lost"] == 0 and report["verify (source vs target)"] == "equal" else 1


async def demo(args: argparse.Namespace, source: Any, target: Any) -> dict[str, Any]:
    first = source.nodes[0] if args.cluster else source
    load = Workload("127.0.0.1", first.port, writers=args.writers, rate=args.rate, cluster=args.cluster)
    load.start()
    print(f"applications write to the source directly: {args.writers} writers x {args.rate:.0f} writes/s", flush=True)
    events: dict[str, Any] = {}
    cut = asyncio.Event()

    def emit(e: dict[str, Any]) -> None:
        kind = e["event"]
        events.setdefault(kind, e)
        if kind == "phase":
            print(f"phase  {e['phase']}", flush=True)
        elif kind == "proxies":
            host, port = e["addresses"][0].rsplit(":", 1)
            print(f"       proxy listening on {e['addresses'][0]}: applications switch to it", flush=True)
            load.point_at(host, int(port))
        elif kind == "copied":
            print(f"       copied {e['keys']} keys in {e['seconds']}s ({e['keys_per_s']:,.0f} keys/s)", flush=True)
        elif kind == "cutover":
            print(f"       cutover: writes paused {e['pause_ms']} ms", flush=True)
            cut.set()
        elif kind == "cutover_aborted":
            print(f"       cutover attempt {e['attempt']} aborted ({e['reason']}); staying in Sync", flush=True)

    opts = MigrationOptions(cutover="auto", gate_settle=1.0, gate_timeout=60, rollback_window=3600)
    m = Migration(source.endpoint(), target.endpoint(), opts, local_proxies("127.0.0.1", 0), emit=emit)
    task = asyncio.create_task(m.run())
    waiter = asyncio.create_task(cut.wait())
    await asyncio.wait([task, waiter], timeout=600, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises the failure
        raise DurableCacheError("the migration ended before its cutover")
    if not cut.is_set():
        m.stop_requested.set()
        await load.finish()
        raise DurableCacheError(f"no cutover within 600 s (phase {m.phase.value}); see the events above")
    await asyncio.sleep(1.0)  # writes keep flowing through the proxy, now to the target
    await load.finish()
    await m.syncer.drain(30) if m.syncer else None  # reverse sync: the source catches up too
    target_client = target.cluster_client() if args.cluster else target.client()
    lost = load.lost(target_client)
    src, dst = await discover(source.endpoint()), await discover(target.endpoint())
    report = await Verifier(src, dst).run()
    m.stop_requested.set()
    await asyncio.wait_for(task, 30)
    copied = events.get("copied", {})
    return {
        "keys copied": copied.get("keys"),
        "copy rate": f"{copied.get('keys_per_s', 0):,.0f} keys/s",
        "cutover write pause": f"{events['cutover']['pause_ms']} ms",
        "slowest acknowledged write": f"{load.max_latency_ms:.1f} ms",
        "writes acknowledged": load.acked,
        "writes with lost replies (uncertain)": sum(x.uncertain for x in load.ledgers),
        "writes lost": len(lost),
        "verify (source vs target)": "equal" if report.equal else f"DIFFERENT {report.counts}",
    }
