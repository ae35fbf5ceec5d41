"""The Copy phase of a migration against `durablecache copy`, side by side (not a test).

One source and one target valkey-server on this machine, N small strings (the issue's case: 200,000).
Each round copies the keyspace twice, in alternating order: once as `durablecache copy` does (BulkCopy
straight into a MoverPool), once as `durablecache migrate` and the operator's worker do in their Copy
phase (BulkCopy feeding the syncer, which owns every copy so that live writes and the bulk copy never
race on a key; MigrationOptions' defaults). The ratio is the median of the rounds' ratios.
Usage: python bench/migrate_copy.py [--keys 200000] [--rounds 3]
"""

from __future__ import annotations

import os
import sys

# bench/copy.py would shadow the standard library's `copy`: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from durablecache.commands._common import run_async  # noqa: E402
from durablecache.copier import BulkCopy  # noqa: E402
from durablecache.keymover import MoverOptions  # noqa: E402
from durablecache.migration import MigrationOptions  # noqa: E402
from durablecache.movers import MoverPool  # noqa: E402
from durablecache.syncer import Syncer  # noqa: E402
from durablecache.testing.localvalkey import LocalServer  # noqa: E402
from durablecache.topology import discover  # noqa: E402


def load(server: LocalServer, n: int) -> None:
    client = server.client()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"key:{i}", f"value-{i}-" + "x" * (i % 48))
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()
    client.close()


async def direct(source: LocalServer, target: LocalServer) -> float:
    """`durablecache copy` with its defaults (commands/copy.py)."""
    target.client().flushall()
    src, dst = await discover(source.endpoint()), await discover(target.endpoint())
    pool = MoverPool(src, dst, size=16, opts=MoverOptions())
    t0 = time.perf_counter()
    summary = await BulkCopy(src, dst, pool.move, concurrency=16).run()
    elapsed = time.perf_counter() - t0
    await pool.close()
    return summary.keys / elapsed


async def through_syncer(source: LocalServer, target: LocalServer) -> float:
    """The Copy phase of Migration (migration.py: _pool, _copy), with MigrationOptions' defaults."""
    target.client().flushall()
    opts = MigrationOptions()
    src, dst = await discover(source.endpoint()), await discover(target.endpoint())
    pool = MoverPool(src, dst, size=max(opts.copy_concurrency, opts.sync_workers) * len(src.primaries),
                     opts=MoverOptions(big_key_bytes=opts.big_key_bytes), max_target_bytes=opts.max_target_bytes)
    syncer = Syncer(pool, workers=opts.sync_workers, max_dirty=opts.max_dirty)
    syncer.start()
    t0 = time.perf_counter()
    summary = await BulkCopy(src, dst, syncer.copy_now, scan_count=opts.scan_count,
                             concurrency=opts.copy_concurrency).run()
    elapsed = time.perf_counter() - t0
    await syncer.stop()
    await pool.close()
    return summary.keys / elapsed


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    source, target = LocalServer().start(), LocalServer(engine="valkey9").start()
    try:
        load(source, args.keys)
        await direct(source, target)          # warm-up: the target's first touch of fresh memory
        ratios = []
        for r in range(args.rounds):
            if r % 2:
                synced, copied = await through_syncer(source, target), await direct(source, target)
            else:
                copied, synced = await direct(source, target), await through_syncer(source, target)
            ratios.append(synced / copied)
            print(f"round {r + 1}: durablecache copy {copied:>9,.0f} keys/s; migrate's Copy phase "
                  f"{synced:>9,.0f} keys/s = {synced / copied:.0%}")
        print(f"ratio migrate Copy / copy: {statistics.median(ratios):.0%} (median of {args.rounds} rounds: "
              f"{', '.join(f'{x:.0%}' for x in ratios)}; target >= 80%)")
    finally:
        source.stop()
        target.stop()


if __name__ == "__main__":
    run_async(main())
