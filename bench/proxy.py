"""Proxy throughput and p99 latency: direct Valkey vs the DurableCache proxy vs a bare asyncio byte
relay vs twemproxy (nutcracker), all in the same run, with redis-benchmark at P=1 and P=16.

    .venv/bin/python bench/proxy.py [--requests 200000] [--clients 50] [--rounds 3] [--stdlib-loop]
                                    [--only T,T] [--pin] [--json]

Every cell runs --rounds times (the whole matrix once per round, in reverse order every other round,
so that a slow moment of this shared machine hits every target alike) and the median is reported;
P=16 runs ten times --requests, so that no run is over in a fraction of a second. A proxy's share of
the relay is taken per round and reported as the median over the rounds, with its range.

The proxy is measured in the two configurations ``durablecache migrate`` uses:

* ``proxy-local`` — marks delivered in-process (the default of ``migrate``: the proxy runs in the
  syncer's process and ``on_marks`` is a direct call of ``Syncer.on_marks``). Here it is a
  ``durablecache proxy`` process without ``--marks-to``, whose ``on_marks`` counts the keys: a plain
  function, the same shape as ``Syncer.on_marks``.
* ``proxy-remote`` — the proxy in its own process (``migrate --proxy-mode subprocess``), its marks
  streamed over TCP to a MarkServer in this process (one MARK frame per ``FLUSH_DELAY``, 5 ms, at
  most; the mark server's work shares this machine's cores with everything else).

The bare relay is the floor any asyncio proxy pays: it copies bytes both ways (Protocol callbacks,
the same event loop style as the proxy) and understands nothing. ``mark-floor`` (only with ``--only``)
models the least an asyncio proxy that marks keys must do on top: the proxy's own scan of each
pipeline (C), the written keys as ``bytes`` objects, the replies counted (compiled), and the keys
handed to a counting function once a client's replies are all in. It is a cost model, not a proxy to
run: it assumes that a chunk holds whole commands and that replies are single frames.

The proxies, the relay and mark-floor run on uvloop, the loop `durablecache proxy` uses;
``--stdlib-loop`` runs them all on the standard library's loop instead (like with like either way).

``--pin`` runs each target under test (the proxies, the relay, twemproxy, mark-floor) alone on the
last CPU and everything else (Valkey, redis-benchmark, the mark server) on the others. Where that
makes redis-benchmark the bottleneck, every target serves about the same requests/s, and the CPU per
request is the measure of what each target would serve with a core to itself. (``direct`` then has
Valkey and redis-benchmark on the other CPUs only: not comparable with an unpinned run.)
"""

from __future__ import annotations

import sys

# bench/ holds copy.py, which would shadow the standard library's copy module for this script.
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("bench")]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import uvloop  # noqa: E402

from durablecache import logs  # noqa: E402
from durablecache.ports import LOOPBACK, free_port  # noqa: E402
from durablecache.proxy.marks import MarkServer  # noqa: E402
from durablecache.testing.localvalkey import LocalServer  # noqa: E402

# What the relay and mark-floor share, none of it on the per-chunk path: the upstream connection made
# per client (what arrives before it is buffered), the closes, the server. Each script's two
# data_received methods are its own, so that neither pays a call the other does not.
PLUMBING = r'''
import asyncio, sys
try:
    import uvloop
except ImportError:
    uvloop = None
UP_PORT, PORT, USE_UVLOOP = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"

class UpBase(asyncio.Protocol):
    def __init__(self, down): self.down = down; self.t = None
    def connection_made(self, t): self.t = t
    def connection_lost(self, e): self.down.t.close()

class DownBase(asyncio.Protocol):
    UP = UpBase
    def connection_made(self, t):
        self.t = t; self.buf = []; self.up = self.UP(self)
        asyncio.get_running_loop().create_task(self.open())
    async def open(self):
        await asyncio.get_running_loop().create_connection(lambda: self.up, "127.0.0.1", UP_PORT)
        if self.buf: self.up.t.write(b"".join(self.buf)); self.buf = []
    def connection_lost(self, e):
        if self.up.t is not None: self.up.t.close()

def serve(down):
    async def main():
        srv = await asyncio.get_running_loop().create_server(down, "127.0.0.1", PORT)
        await srv.serve_forever()
    if USE_UVLOOP and uvloop: uvloop.install()
    asyncio.run(main())
'''

RELAY = PLUMBING + r'''
class Up(UpBase):
    def data_received(self, d): self.down.t.write(d)

class Down(DownBase):
    UP = Up
    def data_received(self, d):
        if self.up.t is None: self.buf.append(d)
        else: self.up.t.write(d)

serve(Down)
'''

FLOOR = PLUMBING + r'''
try:
    from durablecache.proxy._resp import scan_run
except ImportError:          # built without the C module
    from durablecache.proxy.framing import scan_run
from durablecache.proxy.framing import command_head, command_tail, count_scalars
marked = [0]

def on_marks(keys):
    marked[0] += len(keys)

class Up(UpBase):
    def data_received(self, d):
        down = self.down
        n = count_scalars(d, 1 << 30)
        down.expect = 0 if n < 0 else down.expect - n     # n < 0: not plain frames; taken as all in
        if down.expect <= 0:          # every reply in: the keys of the writes are handed over
            down.expect = 0
            if down.keys:
                on_marks(down.keys)
                down.keys = []
        down.t.write(d)

class Down(DownBase):
    UP = Up
    def connection_made(self, t):
        self.keys = []; self.expect = 0
        super().connection_made(t)
    def data_received(self, d):
        argc, start, end = command_head(d, 0)
        if argc > 0:
            key_at = 1 if d[start:end] in (b"SET", b"set") else 0
            after, key_start, key_end = command_tail(d, end + 2, argc - 1, key_at)
            if after > 0:
                if key_start >= 0:
                    self.keys.append(d[key_start:key_end])
                _, more = scan_run(d, after, start, end, key_at, self.keys)
                self.expect += 1 + more
        if self.up.t is None: self.buf.append(d)
        else: self.up.t.write(d)

serve(Down)
'''
TARGETS = ("direct", "proxy-local", "proxy-remote", "relay", "twemproxy", "mark-floor")
OPT_IN = {"mark-floor"}     # measured only when --only names them

ROOT = Path(__file__).resolve().parent.parent
DURABLECACHE = ROOT / ".venv" / "bin" / "durablecache"


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection((LOOPBACK, port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def cpu_seconds(stat_path: str) -> float:
    """User + system CPU time of a process or thread, from /proc (utime and stime, in clock ticks)."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_benchmark(port: int, pipeline: int, test: str, requests: int, clients: int,
                  cpu_of: list[str]) -> dict[str, float]:
    """One redis-benchmark run of ``test`` -> {"rps", "p99_ms", "cpu_us": [per request, for each of
    ``cpu_of`` (/proc stat files)]}."""
    before = [cpu_seconds(path) for path in cpu_of]
    out = subprocess.run(
        ["redis-benchmark", "-h", LOOPBACK, "-p", str(port), "-t", test, "-n", str(requests),
         "-c", str(clients), "-P", str(pipeline), "-r", "100000", "--csv"],
        capture_output=True, text=True, timeout=600, check=True).stdout
    used = [cpu_seconds(path) - b for path, b in zip(cpu_of, before)]
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 8 and cells[0] == test.upper():
            # test, rps, avg, min, p50, p95, p99, max (latencies in ms)
            return {"rps": float(cells[1]), "p99_ms": float(cells[6]),
                    "cpu_us": [u * 1e6 / requests for u in used]}
    raise RuntimeError(f"could not read redis-benchmark output: {out[:500]!r}")


def start_twemproxy(upstream_port: int, tmp: str, pin: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = Path(tmp, "nutcracker.yml")
    conf.write_text(
        "bench:\n"
        f"  listen: {LOOPBACK}:{port}\n"
        "  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  auto_eject_hosts: false\n"
        "  server_connections: 1\n"
        f"  servers:\n   - {LOOPBACK}:{upstream_port}:1\n")
    proc = subprocess.Popen(
        [*pin, "nutcracker", "-c", str(conf), "-s", str(free_port()), "-o", str(Path(tmp, "nc.log"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, port


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="runs per cell; the median is reported")
    ap.add_argument("--stdlib-loop", action="store_true",
                    help="run the proxies and the relay on the standard library's event loop, not uvloop")
    ap.add_argument("--only", metavar="T,T", default="",
                    help="measure only these targets (the relay is always measured): e.g. proxy-remote; "
                         "mark-floor is measured only when named here")
    ap.add_argument("--pin", action="store_true",
                    help="run each target alone on the last CPU, everything else on the others")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logs.configure()      # to stderr: with --json, standard output holds the result alone
    wanted = {"relay", *args.only.split(",")} if args.only else set(TARGETS) - OPT_IN
    unknown = wanted - set(TARGETS)
    if unknown:
        print(f"--only: unknown target(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    for tool in ("redis-benchmark", "nutcracker") + (("taskset",) if args.pin else ()):
        if not shutil.which(tool):
            print(f"{tool} is required (Debian redis-tools / nutcracker / util-linux)", file=sys.stderr)
            return 2
    # --pin: the targets' command lines start with `taskset -c LAST`; this process (and so Valkey,
    # redis-benchmark and the mark server's thread, which inherit it) keeps to the other CPUs.
    target_pin: list[str] = []
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            print("--pin needs at least two CPUs", file=sys.stderr)
            return 2
        os.sched_setaffinity(0, cpus[:-1])
        target_pin = ["taskset", "-c", str(cpus[-1])]
    server = LocalServer(extra=["--io-threads", "1"]).start()
    tmp = tempfile.mkdtemp(prefix="durablecache-bench-")
    procs: list[subprocess.Popen[bytes]] = []
    # The mark server runs on the same kind of loop as the proxies (like the syncer of `migrate`).
    loop = asyncio.new_event_loop() if args.stdlib_loop else uvloop.new_event_loop()
    try:
        # The syncer side of the marks wire: counts what arrives.
        received = {"keys": 0}

        def on_marks(db: int, keys: list[bytes]) -> None:   # synchronous, like Syncer.on_marks
            received["keys"] += len(keys)
        token = "bench-token"
        marks = MarkServer(on_marks, token)
        loop.run_until_complete(marks.start())
        Path(tmp, "token").write_text(token)
        marks_thread = threading.Thread(target=loop.run_forever, daemon=True)
        marks_thread.start()
        marks_cpu = f"/proc/self/task/{marks_thread.native_id}/stat"   # the mark server's own CPU time

        relay_port = free_port()
        relay = subprocess.Popen([*target_pin, sys.executable, "-c", RELAY, str(server.port), str(relay_port),
                                  "0" if args.stdlib_loop else "1"], stdout=subprocess.DEVNULL)
        procs.append(relay)
        wait_port(relay_port, relay)
        floor: tuple[int, int] | None = None
        if "mark-floor" in wanted:
            floor_port = free_port()
            proc = subprocess.Popen([*target_pin, sys.executable, "-c", FLOOR, str(server.port), str(floor_port),
                                     "0" if args.stdlib_loop else "1"], stdout=subprocess.DEVNULL)
            procs.append(proc)
            wait_port(floor_port, proc)
            floor = (floor_port, proc.pid)

        env = dict(os.environ, DURABLECACHE_UVLOOP="0" if args.stdlib_loop else "1")

        def start_proxy(*extra: str) -> tuple[int, int]:
            port = free_port()
            proc = subprocess.Popen([*target_pin, str(DURABLECACHE), "proxy", "--upstream", server.url(),
                                     "--listen", f"{LOOPBACK}:{port}", *extra],
                                    env=env, stdout=subprocess.DEVNULL)
            procs.append(proc)
            wait_port(port, proc)
            return port, proc.pid
        local_port, local_pid = start_proxy()
        remote_port, remote_pid = start_proxy("--marks-to", f"{LOOPBACK}:{marks.port}",
                                              "--marks-token-file", str(Path(tmp, "token")))

        nut, nut_port = start_twemproxy(server.port, tmp, target_pin)
        procs.append(nut)

        # name, port, the /proc stat files whose CPU time is that target's (the server's own is not)
        targets = [("direct", server.port, []),
                   ("proxy-local", local_port, [f"/proc/{local_pid}/stat"]),
                   ("proxy-remote", remote_port, [f"/proc/{remote_pid}/stat", marks_cpu]),
                   ("relay", relay_port, [f"/proc/{relay.pid}/stat"]),
                   ("twemproxy", nut_port, [f"/proc/{nut.pid}/stat"])]
        if floor is not None:
            targets.append(("mark-floor", floor[0], [f"/proc/{floor[1]}/stat"]))
        targets = [t for t in targets if t[0] in wanted]
        runs: dict[tuple[str, int, str], list[dict[str, float]]] = {}
        for round_no in range(args.rounds):
            # Every other round runs the targets in reverse order, so that none always follows the same
            # one (a slow spell of this shared machine then hits them alike).
            order = targets if round_no % 2 == 0 else targets[::-1]
            for pipeline in (1, 16):
                for name, port, cpu_of in order:
                    requests = args.requests * (10 if pipeline > 1 else 1)
                    for test in ("SET", "GET"):
                        r = run_benchmark(port, pipeline, test, requests, args.clients, cpu_of)
                        runs.setdefault((name, pipeline, test), []).append(r)
        rows = [{"target": name, "P": pipeline, "test": test,
                 "rps": statistics.median(r["rps"] for r in cell),
                 "p99_ms": statistics.median(r["p99_ms"] for r in cell),
                 "cpu_us": [round(statistics.median(r["cpu_us"][i] for r in cell), 3)
                            for i in range(len(cell[0]["cpu_us"]))]}
                for (name, pipeline, test), cell in runs.items()]
        # A proxy's share of the relay, per round (both measured within the same minute), then the
        # median and the range over the rounds.
        ratios: dict[str, dict[str, Any]] = {}
        for pipeline in (1, 16):
            for test in ("SET", "GET"):
                relay_runs = runs[("relay", pipeline, test)]
                for proxy_name in ("proxy-local", "proxy-remote", "mark-floor"):
                    cell = runs.get((proxy_name, pipeline, test))
                    if cell is None:
                        continue
                    if len(cell) != len(relay_runs):
                        raise RuntimeError(f"{proxy_name} P={pipeline} {test}: not measured in every round")
                    shares = [mine["rps"] / theirs["rps"] for mine, theirs in zip(cell, relay_runs)]
                    # CPU per request, relay / proxy (the mark server's included): the throughput share
                    # this proxy would reach where CPU, not this machine's two shared cores, limits it.
                    cpu = [theirs["cpu_us"][0] / sum(mine["cpu_us"]) for mine, theirs in zip(cell, relay_runs)]
                    ratios[f"{proxy_name} P={pipeline} {test}"] = {
                        "median": round(statistics.median(shares), 3),
                        "min": round(min(shares), 3), "max": round(max(shares), 3),
                        "rounds": [round(x, 3) for x in shares],
                        "cpu_median": round(statistics.median(cpu), 3),
                        "cpu_min": round(min(cpu), 3), "cpu_max": round(max(cpu), 3)}
        if args.json:
            print(json.dumps({"rows": rows, "proxy_vs_relay": ratios, "marked_keys": received["keys"]}))
        else:
            print(f"{'target':<12} {'P':>3} {'test':<4} {'ops/s':>12} {'p99 ms':>8}  CPU µs/request")
            for row in rows:
                cpu = " + ".join(f"{c:.2f}" for c in row["cpu_us"]) or "-"
                if len(row["cpu_us"]) > 1:
                    cpu += " (proxy + mark server)"
                print(f"{row['target']:<12} {row['P']:>3} {row['test']:<4} {row['rps']:>12,.0f} "
                      f"{row['p99_ms']:>8.3f}  {cpu}")
            print(f"proxy / bare relay, per round (median, and range over {args.rounds} rounds): "
                  f"throughput; CPU per request, relay / proxy")
            for k, v in ratios.items():
                print(f"  {k}: {v['median']:.0%} ({v['min']:.0%}-{v['max']:.0%}); "
                      f"CPU {v['cpu_median']:.0%} ({v['cpu_min']:.0%}-{v['cpu_max']:.0%})")
            print(f"marked keys received by the MarkServer: {received['keys']:,}")
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
