"""durablecache verify: compare two keyspaces key by key in both directions."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from ..progress import choose, emit_json
from ..verify import Verifier, VerifyReport
from ._common import add_pair_arguments, discover_pair, run_async

NAME = "verify"
HELP = "compare --source and --target (existence, type, value digest, expiry); exit 0 equal, 1 different, 2 error"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pair_arguments(p)
    p.add_argument("--sample", type=int, metavar="N", help="check N (at least 1) random keys per side instead of all")
    p.add_argument("--ttl-tolerance-ms", type=int, default=1000, help="allowed expiry difference (default 1000)")


def run(args: argparse.Namespace) -> int:
    report = run_async(verify(args))
    if args.json:
        emit_json(sys.stdout, **report.as_dict())
    else:
        print(render(report))
    return 0 if report.equal else 1


async def verify(args: argparse.Namespace) -> VerifyReport:
    if args.sample is not None and args.sample < 1:
        raise UsageError(f"--sample must be a positive number of keys, not {args.sample} (leave it out to check all)")
    source, target = await discover_pair(args, "verify")
    return await Verifier(source, target, tolerance_ms=args.ttl_tolerance_ms, sample=args.sample,
                          progress=choose(args.json, "verifying")).run()


def render(report: VerifyReport) -> str:
    scope = "sampled" if report.sampled else "all"
    if report.equal:
        return f"equal: {report.checked} keys checked ({scope}) in {report.seconds:.1f}s"
    counts = ", ".join(f"{n} {kind}" for kind, n in report.counts.items() if n)
    lines = [f"DIFFERENT: {counts} ({report.checked} keys checked, {scope})"]
    for d in report.examples:
        lines.append(f"  {d.kind:<7} db{d.db} {d.key.decode('utf-8', 'backslashreplace')!r}: {d.detail}")
    return "\n".join(lines)
