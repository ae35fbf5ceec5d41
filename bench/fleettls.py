"""What TLS on the fleet's mark channel costs, side by side in one run (not a test; docs/ha.md, Transport).

One valkey-server and one proxy whose marks go to a MarkServer over loopback TCP, both on one uvloop
in a thread (as `durablecache proxy --join` and its coordinator), once with plain TCP and once with
the fleet's TLS (a certificate as the operator makes it), alternating rounds:

1. sequential SET latency, marks streamed (the default) and acknowledged before each reply (where
   the channel's round trip is on the write's path);
2. pipelined SETs (pipelines of 1000, distinct keys): the thread's CPU time per SET, which includes
   framing, encrypting and decrypting the marks.

Usage: python bench/fleettls.py [--writes 5000] [--pipelined 200000] [--rounds 3]
"""

from __future__ import annotations

import os
import sys

# bench/copy.py would shadow the standard library's `copy`: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import uvloop  # noqa: E402
import valkey  # noqa: E402

from durablecache.fleettls import FleetTLS, make_certificate  # noqa: E402
from durablecache.proxy import Proxy  # noqa: E402
from durablecache.proxy.marks import MarkServer, RemoteMarks  # noqa: E402
from durablecache.testing.localvalkey import LocalServer  # noqa: E402

TOKEN = "bench-fleet-tls"


class Side:
    """A proxy and its mark server on a loop in a thread, the channel plain or TLS."""

    def __init__(self, source: LocalServer, tls: FleetTLS | None):
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.marks = 0
        self.proxy, self.server, self.remote = self.run(self._setup(source, tls))
        self.client = valkey.Valkey(port=self.proxy.port)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def _count(self, _db: int, keys: list[bytes]) -> None:
        self.marks += len(keys)

    async def _setup(self, source: LocalServer, tls: FleetTLS | None) -> tuple[Proxy, MarkServer, RemoteMarks]:
        server = MarkServer(self._count, TOKEN, tls=tls.server if tls else None)
        await server.start()
        remote = RemoteMarks("127.0.0.1", server.port, TOKEN, tls=tls.client if tls else None)
        await remote.connect()
        proxy = Proxy(source.endpoint(), on_marks=remote)
        await proxy.start()
        return proxy, server, remote

    async def _limit(self, limit: int) -> None:
        self.proxy.delivery.mark_stream_bytes = limit

    async def _cpu(self) -> float:
        return time.thread_time()     # the loop thread's CPU: proxy, marks out, marks in

    def sequential(self, writes: int, acknowledged: bool) -> list[float]:
        self.run(self._limit(0 if acknowledged else 8 << 20))
        out = []
        for i in range(writes):
            t0 = time.perf_counter()
            self.client.set(f"lat:{i}", "v")
            out.append(time.perf_counter() - t0)
        return out

    def pipelined(self, n: int, tag: str) -> float:
        """CPU seconds of the loop thread per SET, pipelines of 1000, every mark received."""
        self.run(self._limit(8 << 20))
        before, cpu0 = self.marks, self.run(self._cpu())
        pipe = self.client.pipeline(transaction=False)
        for i in range(n):
            pipe.set(f"pipe:{tag}:{i}", "v")
            if len(pipe) == 1000:
                pipe.execute()
        pipe.execute()
        deadline = time.monotonic() + 60
        while self.marks - before < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.marks - before >= n, "marks missing"
        return float(self.run(self._cpu()) - cpu0) / n

    def close(self) -> None:
        self.client.close()
        self.run(self.proxy.stop())
        self.run(self.remote.close())
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=5000)
    ap.add_argument("--pipelined", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench-fleettls-"))
    cert, key = make_certificate("bench fleet")
    (d / "c").write_text(cert)
    (d / "k").write_text(key)
    (d / "k").chmod(0o600)
    source = LocalServer().start()
    sides = {"plain": Side(source, None), "tls": Side(source, FleetTLS(str(d / "c"), str(d / "k")))}
    lat: dict[str, list[float]] = {f"{s} {m}": [] for s in sides for m in ("streamed", "acknowledged")}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    try:
        for r in range(args.rounds):
            for name, side in sides.items():
                for mode in ("streamed", "acknowledged"):
                    lat[f"{name} {mode}"] += side.sequential(args.writes, mode == "acknowledged")
                cpu[name].append(side.pipelined(args.pipelined, f"{name}{r}"))
    finally:
        for side in sides.values():
            side.close()
        source.stop()
    out: dict[str, Any] = {k: {"p50_us": round(statistics.median(v) * 1e6, 1)} for k, v in lat.items()}
    for mode in ("streamed", "acknowledged"):
        out[f"p50 ratio tls/plain, {mode}"] = round(out[f"tls {mode}"]["p50_us"] / out[f"plain {mode}"]["p50_us"], 2)
    out["cpu_us_per_pipelined_set"] = {s: [round(x * 1e6, 2) for x in v] for s, v in cpu.items()}
    out["cpu ratio tls/plain (median)"] = round(statistics.median(cpu["tls"]) / statistics.median(cpu["plain"]), 2)
    print(out, flush=True)


if __name__ == "__main__":
    main()
