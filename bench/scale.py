"""How the data path scales, in one run (not a test; issue 17's "Done when", docs/ha.md "Scale").

1. **Proxy processes.** For N proxy processes (default 1, 2 and 4; this machine has 2 cores), each
   round starts a fresh source and target valkey-server with a small keyspace, a coordinator (Migration
   with a Fleet, manual cutover) in this process and one `durablecache proxy --join … --processes N`
   group on one port (SO_REUSEPORT, as in a proxy pod). Once the migration awaits approval (Sync, the
   planned verify done) redis-benchmark (Debian `redis-tools`, 50 clients) runs SET and GET through
   the group at pipeline depth 1 and 16: requests/s, and the CPU time the proxy processes spent per
   request (user + system from /proc, the group's supervisor included) — what projects requests/s per
   vCPU — and the coordinator's (this process: mark intake and the syncer copying every written key).
   Then a write load (2 writers × 500 writes/s) through the group, approval, and the cutover's write
   pause (freeze → drain → flip → unfreeze over N members); then the writes acknowledged and missing
   on the target. Each round also runs the same loads against a valkey-server alone (the table's
   first row: what this shared machine gave in the same minutes). The order alternates (reversed
   every other round).
2. **Losing a proxy**: bench/fleet.py's measurement (three joined proxies under load, SIGTERM one,
   SIGKILL another: time until cutover-ready again), at --loss-keys keys.
3. **The Copy phase**: bench/migrate_copy.py, `durablecache migrate`'s Copy phase against
   `durablecache copy`, side by side, --copy-rounds rounds.

Prints one table (medians and ranges over the rounds) and, with --json, the raw figures.
Usage: python bench/scale.py [--rounds 3] [--processes 1,2,4] [--keys 20000] [--loss-keys 100000]
                             [--copy-keys 200000] [--copy-rounds 3] [--only fleet,loss,copy] [--json]
"""

from __future__ import annotations

import os
import sys

# bench/copy.py would shadow the standard library's `copy`: drop this folder from the import path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import uvloop  # noqa: E402

from durablecache import logs  # noqa: E402
from durablecache.commands.migrate import proxy_starter  # noqa: E402
from durablecache.fleet import Fleet  # noqa: E402
from durablecache.migration import Migration  # noqa: E402
from durablecache.options import MigrationOptions  # noqa: E402
from durablecache.ports import free_port  # noqa: E402
from durablecache.testing.localvalkey import LocalServer  # noqa: E402
from durablecache.testing.workload import Workload  # noqa: E402

TOKEN = "bench-scale"
CLIENTS = 50
BENCH_TIMEOUT = 600.0
# (pipeline depth, command, requests): P=16 runs ten times as many, so no run is over in a blink.
LOADS = ((1, "SET", 100_000), (1, "GET", 100_000), (16, "SET", 1_000_000), (16, "GET", 1_000_000))


def sibling(name: str) -> ModuleType:
    """Another benchmark of this folder as a module (bench/ is not a package, and is off sys.path)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (the --processes supervisor and its children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            todo += [int(c) for c in (task / "children").read_text().split()]
    return out


async def benchmark(port: int, pipeline: int, test: str, requests: int, proxy_pids: list[int]) -> dict[str, float]:
    """One redis-benchmark run -> requests/s and CPU µs per request of the proxies and of this process."""
    before = [cpu_seconds(p) for p in proxy_pids]
    own_before = cpu_seconds("self")
    proc = await asyncio.create_subprocess_exec(
        "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", test.lower(), "-n", str(requests),
        "-c", str(CLIENTS), "-P", str(pipeline), "-r", "100000", "--csv",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), BENCH_TIMEOUT)
    proxy_cpu = sum(cpu_seconds(p) for p in proxy_pids) - sum(before)
    own_cpu = cpu_seconds("self") - own_before
    for line in out.decode().splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 8 and cells[0] == test:
            return {"rps": float(cells[1]), "p99_ms": float(cells[6]),
                    "proxy_cpu_us": proxy_cpu * 1e6 / requests, "coordinator_cpu_us": own_cpu * 1e6 / requests}
    raise RuntimeError(f"could not read redis-benchmark's output: {out[:300]!r}")


async def fleet_round(processes: int, keys: int) -> dict[str, Any]:
    """One migration through one group of ``processes`` joined proxy processes: throughput, then the
    cutover."""
    fleet_bench = sibling("fleet")
    source, target = LocalServer().start(), LocalServer(engine="valkey9").start()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    token_file = work / "join.token"
    token_file.write_text(TOKEN)
    group: asyncio.subprocess.Process | None = None
    load: Workload | None = None
    try:
        fleet_bench.load(source, keys)
        ev = fleet_bench.Events()
        fleet = Fleet(TOKEN, emit=ev.emit)
        starter, _ = proxy_starter("127.0.0.1", 0, "inprocess", ev.emit, fleet=fleet, spawn=False)
        opts = MigrationOptions(cutover="manual", gate_settle=0.5, gate_timeout=120, rollback_window=1.0)
        m = Migration(source.endpoint(), target.endpoint(), opts, starter, emit=ev.emit)
        task = asyncio.create_task(m.run())
        await ev.wait(lambda e: e["event"] == "coordinator", timeout=120)
        port = free_port()
        with open(work / "proxy.log", "ab") as err:
            group = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "durablecache.cli", "--log-json", "proxy", "--join", f"127.0.0.1:{fleet.port}",
                "--join-token-file", str(token_file), "--admin", "127.0.0.1:0", "--listen", f"127.0.0.1:{port}",
                "--proxy-id", "group", "--processes", str(processes),
                stdout=asyncio.subprocess.DEVNULL, stderr=err)
        await ev.wait(lambda e: e["event"] == "proxy_joined" and e["members"] >= processes, timeout=120)
        await ev.wait(lambda e: e["event"] == "awaiting_approval", timeout=600)
        pids = process_tree(group.pid)
        out: dict[str, Any] = {"processes": processes}
        for pipeline, test, requests in LOADS:
            out[f"P{pipeline} {test}"] = await benchmark(port, pipeline, test, requests, pids)
        # The backlog those writes left is copied before the cutover attempt (ready_backlog).
        since = len(ev.seen)
        load = Workload("127.0.0.1", port, writers=2, rate=500, prefix="load")
        load.start()
        await asyncio.sleep(1.0)   # the load runs before the cutover: a pause with writes in flight
        assert m.approve() is None
        _, cut = await ev.wait(lambda e: e["event"] == "cutover", since, timeout=600)
        out["pause_ms"] = cut["pause_ms"]
        await ev.wait(lambda e: e["event"] == "phase" and e["phase"] == "Complete", since, timeout=600)
        await load.finish()
        client = target.client()
        out["acknowledged"], out["lost"] = load.acked, len(load.lost(client))
        client.close()
        await stop(group)      # before the coordinator: the proxies leave with BYE
        m.stop_requested.set()
        await asyncio.wait_for(task, 60)
        return out
    finally:
        if load is not None and not load.stop.is_set():
            await load.finish()
        if group is not None:
            await stop(group)
        source.stop()
        target.stop()
        shutil.rmtree(work, ignore_errors=True)


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """median [min–max]"""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def fleet_table(runs: list[dict[str, Any]], counts: list[int]) -> list[str]:
    lines = ["| proxy processes | SET P=1 req/s | GET P=1 req/s | SET P=16 req/s | GET P=16 req/s | "
             "proxy CPU µs/req (SET P=1 / P=16) | → req/s per vCPU (SET P=1 / P=16) | "
             "coordinator CPU µs/req (SET P=1 / P=16) | cutover pause ms | writes acked / lost |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in [0, *counts]:
        mine = [r for r in runs if r["processes"] == n]
        cells = [str(n) if n else "none (valkey-server directly)"]
        for key in ("P1 SET", "P1 GET", "P16 SET", "P16 GET"):
            cells.append(spread([r[key]["rps"] for r in mine]))
        if not n:
            lines.append("| " + " | ".join(cells + ["—"] * 5) + " |")
            continue
        cpu = {k: [r[k]["proxy_cpu_us"] for r in mine] for k in ("P1 SET", "P16 SET")}
        cells.append(" / ".join(spread(v, "{:.2f}") for v in cpu.values()))
        cells.append(" / ".join(f"{1e6 / statistics.median(v):,.0f}" for v in cpu.values()))
        cells.append(" / ".join(spread([r[k]["coordinator_cpu_us"] for r in mine], "{:.2f}")
                                for k in ("P1 SET", "P16 SET")))
        cells.append(spread([r["pause_ms"] for r in mine], "{:.2f}"))
        cells.append(f"{sum(r['acknowledged'] for r in mine):,} / {sum(r['lost'] for r in mine)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


async def direct_round() -> dict[str, Any]:
    """The same loads straight to a valkey-server of their own: what this machine gives without a proxy
    in the same minutes (the row the proxies are read against)."""
    server = LocalServer().start()
    try:
        out: dict[str, Any] = {"processes": 0}
        for pipeline, test, requests in LOADS:
            out[f"P{pipeline} {test}"] = await benchmark(server.port, pipeline, test, requests, [])
        return out
    finally:
        server.stop()


async def fleet_part(counts: list[int], rounds: int, keys: int) -> list[dict[str, Any]]:
    runs = []
    for r in range(rounds):
        for n in ([0, *counts] if r % 2 == 0 else [*counts[::-1], 0]):
            res = await (fleet_round(n, keys) if n else direct_round())
            print(f"round {r + 1}, {n} process(es): " + json.dumps(res), file=sys.stderr, flush=True)
            runs.append(res)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", default="1,2,4", help="proxy processes per round, comma-separated")
    ap.add_argument("--keys", type=int, default=20_000, help="keyspace of each proxy-processes round")
    ap.add_argument("--loss-keys", type=int, default=100_000)
    ap.add_argument("--copy-keys", type=int, default=200_000)
    ap.add_argument("--copy-rounds", type=int, default=3)
    ap.add_argument("--only", default="fleet,loss,copy")
    ap.add_argument("--json", action="store_true", help="the raw figures as one JSON object, after the table")
    args = ap.parse_args()
    logs.configure(level="warning")   # to stderr: standard output holds the results alone
    if not shutil.which("redis-benchmark"):
        sys.exit("redis-benchmark is required (Debian redis-tools)")
    parts = set(args.only.split(","))
    counts = [int(n) for n in args.processes.split(",")]
    result: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0))}
    if "fleet" in parts:
        result["fleet"] = uvloop.run(fleet_part(counts, args.rounds, args.keys))
    if "loss" in parts:
        result["loss"] = uvloop.run(sibling("fleet").losses(args.loss_keys))
    if "copy" in parts:
        result["copy"] = sibling("migrate_copy").measure(args.copy_keys, args.copy_rounds, "inprocess", quiet=True)

    print(f"bench/scale.py on {result['cpus']} CPUs, shared: medians [ranges] over {args.rounds} rounds")
    if "fleet" in result:
        print("\n".join(fleet_table(result["fleet"], counts)))
    if "loss" in result:
        loss = result["loss"]
        print(f"losing a proxy ({loss['keys']:,} keys, 3 joined proxies under load): SIGKILL → cutover-ready "
              f"again {loss['kill']['ready_again_s']} s (the planned verify pass: {loss['planned_verify_s']} s); "
              f"SIGTERM → left in {loss['roll']['left_s']} s, {loss['roll']['repairs']} repairs; "
              f"{loss['acknowledged']:,} writes acknowledged, {loss['lost']} lost")
    if "copy" in result:
        c = result["copy"]
        print(f"Copy phase ({c['keys']:,} small strings): migrate {spread(c['migrate_keys_per_s'])} keys/s, "
              f"copy {spread(c['copy_keys_per_s'])} keys/s; ratio {spread(c['ratios'], '{:.0%}')} "
              f"(per round: {', '.join(f'{x:.0%}' for x in c['ratios'])})")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
