"""durablecache copy: copy every key of one keyspace into another, resumably."""

from __future__ import annotations

import argparse
import sys

from ..checkpoint import FileCheckpoint, MemoryCheckpoint
from ..copier import BulkCopy, CopySummary, check_pair
from ..keymover import DEFAULT_BIG_KEY_BYTES, MoverOptions
from ..movers import DEFAULT_TARGET_BYTES_PER_PRIMARY, MiB, MoverPool
from ..progress import choose, emit_json
from ._common import add_pair_arguments, discover_pair, run_async

NAME = "copy"
HELP = "copy every key (all types, exact expiry) from --source to --target; resumable with --state-file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pair_arguments(p)
    p.add_argument("--state-file", metavar="PATH", help="checkpoint file: a killed copy resumes from it")
    p.add_argument("--max-ops", type=float, metavar="N", help="at most N commands per second on the source")
    p.add_argument("--max-target-mib", type=float, default=DEFAULT_TARGET_BYTES_PER_PRIMARY / MiB, metavar="MIB",
                   help="write cap per target primary in MiB/s (default %(default)s: below ElastiCache's "
                        "100 MiB/s durable limit; 0 = unlimited)")
    p.add_argument("--big-key-mib", type=float, default=DEFAULT_BIG_KEY_BYTES / MiB, metavar="MIB",
                   help="keys larger than this are copied in chunks (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="batches in flight per source shard (default %(default)s)")
    p.add_argument("--scan-count", type=int, default=2000, help="SCAN COUNT per batch (default %(default)s)")
    p.add_argument("--allow-nonempty", action="store_true", help="copy even if the target already has keys")


def run(args: argparse.Namespace) -> int:
    summary = run_async(copy(args))
    if args.json:
        emit_json(sys.stdout, **summary.as_dict())
    else:
        rate = summary.keys / summary.seconds if summary.seconds else 0.0
        print(f"copied {summary.keys} keys ({summary.bytes / 1e6:.1f} MB, {summary.big} big keys in chunks), "
              f"skipped {summary.skipped} expired or deleted, in {summary.seconds:.1f}s ({rate:,.0f} keys/s)"
              + (" — resumed from checkpoint" if summary.resumed else ""))
    return 0


async def copy(args: argparse.Namespace) -> CopySummary:
    if args.concurrency < 1 or args.scan_count < 1 or args.big_key_mib <= 0:
        from ..errors import UsageError

        raise UsageError("--concurrency, --scan-count and --big-key-mib must be positive")
    source, target = await discover_pair(args, "copy")
    store = FileCheckpoint(args.state_file) if args.state_file else MemoryCheckpoint()
    resuming = bool(store.load())
    await check_pair(source, target, allow_nonempty=args.allow_nonempty or resuming)
    opts = MoverOptions(big_key_bytes=int(args.big_key_mib * MiB))
    pool = MoverPool(source, target, size=args.concurrency * max(1, len(source.primaries)), opts=opts,
                     max_source_ops=args.max_ops, max_target_bytes=(args.max_target_mib * MiB) or None)

    try:
        bulk = BulkCopy(source, target, pool.move, store=store, progress=choose(args.json),
                        scan_count=args.scan_count, concurrency=args.concurrency)
        return await bulk.run()
    finally:
        await pool.close()
