"""Run the fault matrix: every fault x phase cell, one after the other, each a real migration under
ledger write load; print a Markdown table (fault | phase | acked | lost | verify | tool said | verdict).

    python tests/faults/matrix.py                      # all cells (make faults)
    python tests/faults/matrix.py --only "flushdb"     # cells whose "fault@phase" contains any given word
    python tests/faults/matrix.py --list
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "operator"))

from fault_cells import RESTRICTED, Result, all_cells, run_cell  # noqa: E402

HEADER = ("| fault | phase | acked | lost | verify | tool said | verdict |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="WORDS",
                    help="run cells whose 'fault@phase' contains this text (case-insensitive; repeatable)")
    ap.add_argument("--list", action="store_true", help="list the cells and exit")
    ap.add_argument("--json", metavar="PATH", help="also write every result as JSON here")
    ap.add_argument("--logs", metavar="DIR", type=Path,
                    help="keep each failing cell's events, state file and stderr under DIR")
    args = ap.parse_args()
    cells = [c for c in all_cells() if not args.only or any(o.lower() in c.name.lower() for o in args.only)]
    if args.list:
        for c in cells:
            print(f"{c.name}  (expect {c.expect})")
        return 0
    if not cells:
        print("no cell matches", file=sys.stderr)
        return 2
    started = time.monotonic()
    results: list[Result] = []
    for i, cell in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {cell.name} ...", file=sys.stderr, flush=True)
        r = run_cell(cell, args.logs)
        results.append(r)
        print(f"    {r.seconds:.0f}s {'ok' if r.ok else 'FAIL: ' + r.why}", file=sys.stderr, flush=True)
    total = time.monotonic() - started
    print(f"Fault matrix, {datetime.date.today().isoformat()}, {len(results)} cells in {total:.0f} s "
          f"(pid {os.getpid()}), servers {'ElastiCache-restricted' if RESTRICTED else 'unrestricted'}:\n")
    print(HEADER)
    for r in results:
        print(r.row())
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} ok, {len(failed)} failing.")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
