"""Copy throughput benchmark (not a test).

One source and one target valkey-server on this machine, N mixed keys (mostly small strings and
hashes, some lists/sets/zsets, a few big keys, 30% with TTLs). Three measurements in the same run:
  naive    one connection, one key at a time: PEXPIRETIME+DUMP, then RESTORE (on a subset of keys)
  ceiling  the target's ingest ceiling: the same payloads RESTOREd by one pipelined stream
  copier   `durablecache copy` (BulkCopy + MoverPool with default settings)
Ceiling and copy run in pairs, --rounds times (after one warm-up ceiling run that pays for the
target's first touch of fresh memory); the ratio reported is the median of the pairs' ratios, so
that a slow moment of this shared machine does not decide it. Each line also shows the CPU each
process spent per key (source server, target server, this Python process), read from /proc: on a
2-core machine the three share two cores, so these bound the copy.
Usage: python bench/copy.py [--keys 1000000] [--rounds 3]
"""

from __future__ import annotations

import os
import sys

# This file is named copy.py, which would shadow the standard library's `copy` for everything
# imported after it: drop its own folder from the import path first.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from durablecache.commands._common import run_async  # noqa: E402
from durablecache.copier import BulkCopy  # noqa: E402
from durablecache.keymover import MoverOptions  # noqa: E402
from durablecache.movers import MoverPool  # noqa: E402
from durablecache.resp import Connection, pack  # noqa: E402
from durablecache.testing.localvalkey import LocalServer  # noqa: E402
from durablecache.topology import discover  # noqa: E402


def cpu_seconds(server: LocalServer | None = None) -> float:
    """CPU time (user + system) of a server process, or of this process."""
    if server is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU µs per key spent by the source server, the target server and this process."""

    def __init__(self, source: LocalServer, target: LocalServer):
        self.servers = (source, target)
        self.before = self._now()

    def _now(self) -> list[float]:
        return [cpu_seconds(self.servers[0]), cpu_seconds(self.servers[1]), cpu_seconds()]

    def report(self, n: int) -> str:
        src, dst, py = ((a - b) / n * 1e6 for a, b in zip(self._now(), self.before))
        return f"CPU us/key: source {src:.2f}, target {dst:.2f}, python {py:.2f}"


async def flush(target: LocalServer) -> None:
    """Empty the target synchronously: a lazy FLUSHALL would free the old keys on a background
    thread while the next measurement runs, stealing CPU from it."""
    t = await Connection.open(target.endpoint())
    await t.call("FLUSHALL", "SYNC")
    await t.close()


def load(server: LocalServer, n: int) -> int:
    """Fill the source quickly with raw pipelined RESP; returns payload bytes written."""
    import socket

    rnd = random.Random(7)
    sock = socket.create_connection(("127.0.0.1", server.port))
    total = 0
    batch: list[tuple] = []

    def flush() -> None:
        sock.sendall(pack(batch))
        want, got = len(batch), b""
        while got.count(b"\r\n") < want:  # every reply here is a one-line +OK / :N
            got += sock.recv(1 << 20)
        batch.clear()

    for i in range(n):
        r = rnd.random()
        key = f"key:{i:08d}"
        if r < 0.55:
            value = os.urandom(rnd.randint(20, 200)).hex()
            batch.append(("SET", key, value))
            total += len(value)
        elif r < 0.85:
            fields = [x for j in range(rnd.randint(3, 12)) for x in (f"f{j}", f"v{rnd.randint(0, 10**6)}")]
            batch.append(("HSET", key, *fields))
            total += sum(len(x) for x in fields)
        elif r < 0.92:
            batch.append(("RPUSH", key, *[f"item-{j}" for j in range(rnd.randint(5, 40))]))
        elif r < 0.96:
            batch.append(("SADD", key, *[f"member-{j}" for j in range(rnd.randint(5, 40))]))
        else:
            batch.append(("ZADD", key, *[x for j in range(rnd.randint(5, 40)) for x in (j * 1.5, f"m{j}")]))
        if rnd.random() < 0.30:
            batch.append(("PEXPIRE", key, rnd.randint(600_000, 3_600_000)))
        if len(batch) >= 2000:
            flush()
    for b in range(5):  # a few big keys (~2 MB each)
        blob = os.urandom(1 << 20).hex()
        batch.append(("SET", f"big:{b}", blob))
        total += len(blob)
    flush()
    sock.close()
    return total


async def dump_all(server: LocalServer, limit: int | None = None) -> list[tuple[bytes, int, bytes]]:
    conn = await Connection.open(server.endpoint())
    out: list[tuple[bytes, int, bytes]] = []
    cursor = 0
    while True:
        cursor_raw, keys = await conn.call("SCAN", cursor, "COUNT", 2000)
        cursor = int(cursor_raw)
        replies = await conn.pipeline([c for k in keys for c in (("PEXPIRETIME", k), ("DUMP", k))])
        for k, exp, payload in zip(keys, replies[::2], replies[1::2]):
            out.append((k, max(int(exp), 0), payload))
        if cursor == 0 or (limit and len(out) >= limit):
            break
    await conn.close()
    return out[:limit] if limit else out


async def naive(source: LocalServer, target: LocalServer, keys: list[bytes]) -> float:
    s, t = await Connection.open(source.endpoint()), await Connection.open(target.endpoint())
    t0 = time.perf_counter()
    for k in keys:
        exp, payload = await s.pipeline([("PEXPIRETIME", k), ("DUMP", k)])
        await t.call("RESTORE", k, max(int(exp), 0), payload, "REPLACE", "ABSTTL")
    elapsed = time.perf_counter() - t0
    await s.close()
    await t.close()
    return len(keys) / elapsed


async def ceiling(source: LocalServer, target: LocalServer,
                  payloads: list[tuple[bytes, int, bytes]]) -> tuple[float, str]:
    await flush(target)
    t = await Connection.open(target.endpoint())
    batches = [[("RESTORE", k, e, p, "REPLACE", "ABSTTL") for k, e, p in payloads[i:i + 1000]]
               for i in range(0, len(payloads), 1000)]
    meter = CpuMeter(source, target)
    t0 = time.perf_counter()
    for b in batches:
        await t.pipeline(b)
    elapsed = time.perf_counter() - t0
    cpu = meter.report(len(payloads))
    await t.close()
    return len(payloads) / elapsed, cpu


async def copier(source: LocalServer, target: LocalServer, conc: int) -> tuple[float, float, int, str]:
    await flush(target)
    src, dst = await discover(source.endpoint()), await discover(target.endpoint())
    pool = MoverPool(src, dst, size=conc, opts=MoverOptions())

    meter = CpuMeter(source, target)
    summary = await BulkCopy(src, dst, pool.move, concurrency=conc).run()
    cpu = meter.report(summary.keys)
    await pool.close()
    return summary.keys / summary.seconds, summary.bytes / summary.seconds / 1e6, summary.keys, cpu


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--naive-keys", type=int, default=30_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    source, target = LocalServer().start(), LocalServer().start()
    try:
        t0 = time.perf_counter()
        load(source, args.keys)
        dbsize = source.client().dbsize()
        print(f"loaded {dbsize} keys in {time.perf_counter() - t0:.1f}s")
        payloads = await dump_all(source)
        naive_rate = await naive(source, target, [k for k, _, _ in payloads[: args.naive_keys]])
        print(f"naive DUMP/RESTORE loop : {naive_rate:>10,.0f} keys/s ({args.naive_keys} keys)")
        await ceiling(source, target, payloads)  # warm-up: the target's first touch of fresh memory
        ratios, copies = [], []
        for r in range(args.rounds):
            ceiling_rate, ceiling_cpu = await ceiling(source, target, payloads)
            copy_rate, copy_mbps, copied, copy_cpu = await copier(source, target, args.concurrency)
            assert copied == dbsize, (copied, dbsize)
            ratios.append(copy_rate / ceiling_rate)
            copies.append(copy_rate)
            print(f"round {r + 1}: target ingest ceiling {ceiling_rate:>9,.0f} keys/s ({ceiling_cpu})")
            print(f"round {r + 1}: durablecache copy     {copy_rate:>9,.0f} keys/s, {copy_mbps:.1f} MB/s "
                  f"({copied} keys; {copy_cpu}) = {copy_rate / ceiling_rate:.0%} of the ceiling")
        copy_rate = statistics.median(copies)
        print(f"ratio copy / naive      : {copy_rate / naive_rate:.1f}x (median copy; target >= 3x)")
        print(f"ratio copy / ceiling    : {statistics.median(ratios):.0%} (median of {args.rounds} pairs: "
              f"{', '.join(f'{x:.0%}' for x in ratios)}; target >= 80%)")
    finally:
        source.stop()
        target.stop()


if __name__ == "__main__":
    run_async(main())  # the event loop `durablecache copy` uses (uvloop where installed)
