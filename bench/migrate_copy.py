"""The Copy phase of `durablecache migrate` against `durablecache copy`, side by side (not a test).

One source and one target valkey-server on this machine, N small strings (the issue's case: 200,000).
Each round runs both commands on the same keyspace, in alternating order, each as its own process with
its default settings: `durablecache copy --json` (its summary's keys/s), and `durablecache migrate
--json` (an in-process proxy, as by default; the operator's worker runs the same Migration) until its
`copied` event, whose keys/s is measured the same way (BulkCopy.run's time), then stopped. The target is
emptied before each. The ratio is the median of the rounds' ratios.

Each command's CPU time per key copied is measured too, less at the mercy of other processes than the
keys/s: for migrate, its process's CPU (user + system, /proc) between its `phase: Copy` and `copied`
events; for copy, its process's CPU less that of the same command copying an empty source (start-up,
discovery and checks), both measured in each round.
Usage: python bench/migrate_copy.py [--keys 200000] [--rounds 5] [--proxy-mode inprocess|subprocess]
                                   [--compare OTHER_TREE/operator] [--json]
Prints one line per round and a summary line; `--json` prints the summary as one JSON object instead.
`--compare` also runs, in every round, the `migrate` of another tree (its operator/ folder on
PYTHONPATH; e.g. the code before a change), against the same round's `copy`.
"""

from __future__ import annotations

import os
import sys

# bench/copy.py would shadow the standard library's `copy`: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from durablecache.ports import free_port  # noqa: E402
from durablecache.testing.localvalkey import LocalServer, stop_process  # noqa: E402

COMMAND_TIMEOUT = 300.0   # one command's copy of the keyspace, at most
COLUMN = {"copy": "durablecache copy", "migrate": "this tree's migrate Copy phase",
          "compare": "the other tree's migrate Copy phase"}


def cli() -> list[str]:
    """The `durablecache` entry point of the interpreter running this (PYTHONPATH picks the tree)."""
    found = shutil.which("durablecache", path=os.path.dirname(sys.executable))
    return [sys.executable, found] if found else [sys.executable, "-c",
                                                  "import sys; from durablecache.cli import main; sys.exit(main())"]


def load(server: LocalServer, n: int) -> None:
    client = server.client()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"key:{i}", f"value-{i}-" + "x" * (i % 48))
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()
    client.close()


def url(server: LocalServer) -> str:
    return f"valkey://127.0.0.1:{server.port}"


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_copy(source: LocalServer, target: LocalServer, keys: int) -> tuple[float, float]:
    """`durablecache copy` with its defaults: keys/s from its JSON summary, and its CPU seconds."""
    target.client().flushall()
    before = children_cpu()
    out = subprocess.run([*cli(), "copy", "--source", url(source), "--target", url(target), "--json"],
                         capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True)
    cpu = children_cpu() - before
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    if summary["keys"] != keys:
        raise RuntimeError(f"copy copied {summary['keys']} keys, not {keys}")
    return float(summary["keys"]) / max(float(summary["seconds"]), 1e-3), cpu   # (an empty copy: 0 s)


def run_migrate(source: LocalServer, target: LocalServer, keys: int, proxy_mode: str,
                pythonpath: str | None = None) -> tuple[float, float]:
    """`durablecache migrate` with its defaults (a short gate: nothing else uses the source) until
    its Copy phase ends: keys/s from its `copied` event, and its CPU seconds in the Copy phase."""
    target.client().flushall()
    cmd = [*cli(), "migrate", "--source", url(source), "--target", url(target), "--json",
           "--listen", f"127.0.0.1:{free_port()}", "--cutover", "manual", "--gate-settle", "0.3s",
           "--proxy-mode", proxy_mode]
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + COMMAND_TIMEOUT
    copy_started: float | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:   # ends when the process does; bounded by the deadline below
            event: dict[str, Any] = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "phase" and event.get("phase") == "Copy":
                copy_started = process_cpu(proc.pid)
            if event.get("event") == "copied":
                cpu = process_cpu(proc.pid) - (copy_started or 0.0)
                if event["keys"] != keys:
                    raise RuntimeError(f"migrate copied {event['keys']} keys, not {keys}")
                if copy_started is None:
                    raise RuntimeError("migrate reported no Copy phase")
                return float(event["keys"]) / float(event["seconds"]), cpu
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"migrate ended without a `copied` event (exit {proc.poll()})")
    finally:
        stop_process(proc, 30)


def measure(keys: int, rounds: int, proxy_mode: str, quiet: bool = False,
            compare: str | None = None) -> dict[str, Any]:
    """Both commands (and the other tree's migrate), the order rotating, ``rounds`` times; rates,
    CPU microseconds per key and the ratios per round."""
    source, target = LocalServer().start(), LocalServer(engine="valkey9").start()
    empty = LocalServer().start()
    rates: dict[str, list[float]] = {"copy": [], "migrate": [], **({"compare": []} if compare else {})}
    cpu: dict[str, list[float]] = {name: [] for name in rates}
    runs = {"copy": lambda: run_copy(source, target, keys),
            "migrate": lambda: run_migrate(source, target, keys, proxy_mode),
            "compare": lambda: run_migrate(source, target, keys, proxy_mode, compare)}
    try:
        load(source, keys)
        run_copy(source, target, keys)          # warm-up: the target's first touch of fresh memory
        names = list(rates)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                rate, seconds = runs[name]()
                if name == "copy":
                    seconds -= run_copy(empty, target, 0)[1]   # copy's start-up, discovery and checks
                rates[name].append(rate)
                cpu[name].append(seconds / keys * 1e6)
            if not quiet:
                copied = rates["copy"][-1]
                print(f"round {r + 1}: durablecache copy {copied:>9,.0f} keys/s, {cpu['copy'][-1]:.2f} µs CPU/key; "
                      + "; ".join(f"{'other tree' if n == 'compare' else 'this tree'}'s migrate Copy phase "
                                  f"{rates[n][-1]:>9,.0f} keys/s = {rates[n][-1] / copied:.0%}, "
                                  f"{cpu[n][-1]:.2f} µs CPU/key" for n in names[1:]), flush=True)
    finally:
        source.stop()
        target.stop()
        empty.stop()
    ratios = [m / c for m, c in zip(rates["migrate"], rates["copy"])]
    out = {"keys": keys, "rounds": rounds, "proxy_mode": proxy_mode, "copy_keys_per_s": rates["copy"],
           "migrate_keys_per_s": rates["migrate"], "ratios": ratios, "ratio_median": statistics.median(ratios),
           "copy_cpu_us_per_key": cpu["copy"], "migrate_cpu_us_per_key": cpu["migrate"]}
    if compare:
        other = [m / c for m, c in zip(rates["compare"], rates["copy"])]
        out.update(compare=compare, compare_keys_per_s=rates["compare"], compare_ratios=other,
                   compare_ratio_median=statistics.median(other), compare_cpu_us_per_key=cpu["compare"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--proxy-mode", choices=["inprocess", "subprocess"], default="inprocess")
    ap.add_argument("--compare", metavar="OTHER_TREE/operator", help="also run this tree's migrate")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = measure(args.keys, args.rounds, args.proxy_mode, quiet=args.json, compare=args.compare)
    if args.json:
        print(json.dumps(res))
        return
    c, m = res["copy_keys_per_s"], res["migrate_keys_per_s"]
    print(f"durablecache copy: median {statistics.median(c):,.0f} keys/s ({min(c):,.0f}–{max(c):,.0f}); "
          f"migrate's Copy phase: median {statistics.median(m):,.0f} keys/s ({min(m):,.0f}–{max(m):,.0f})")
    print(f"ratio migrate Copy / copy: {res['ratio_median']:.0%} (median of {args.rounds} rounds: "
          f"{', '.join(f'{x:.0%}' for x in res['ratios'])}; target >= 80%)")
    if args.compare:
        print(f"the other tree's migrate Copy / copy: {res['compare_ratio_median']:.0%} (per round: "
              f"{', '.join(f'{x:.0%}' for x in res['compare_ratios'])})")
    for name in ("copy", "migrate", "compare") if args.compare else ("copy", "migrate"):
        us = res[f"{name}_cpu_us_per_key"]
        print(f"CPU per key, {COLUMN[name]}: median {statistics.median(us):.2f} µs ({min(us):.2f}–{max(us):.2f})")


if __name__ == "__main__":
    main()
