"""The fast subset of the fault matrix, run by plain pytest (and so by `make test`): five cells, each a
real `durablecache migrate` child process under ledger write load, each under 30 s.

A cell that depends on a fault-safety feature not yet on this branch is xfail(strict=True) with the
feature named, so that it flips (and fails as XPASS) the day the feature lands and the mark must go."""

from __future__ import annotations

import dataclasses

import pytest
from fault_cells import Cell, find, run_cell

FAST = [
    ("target restarted empty", "Sync", None),
    ("client writing directly", "Sync", None),
    ("migration SIGKILLed after FLIP", "Cutover", None),
    ("network to target cut", "Sync", None),
    ("EVAL flushdb", "Sync",
     "feature (e) not on this branch yet: FLUSHDB inside EVAL passes the proxy during a migration"),
]


# Intermittent on the current code (docs/reliability.md): in about one run of three the migration
# restarted from its state file fails its verify-and-repair with "<target> closed the connection" and
# ends Failed, with the proxy gone. Not a missing feature, so not strict: it still runs every time.
FLAKY = {"migration SIGKILLed after FLIP": "intermittent: the resumed migration's repair fails with "
                                           "'<target> closed the connection' and the migration ends Failed"}


def fast(fault: str, phase: str, xfail: str | None) -> object:
    cell = dataclasses.replace(find(fault, phase), refuse_wait=8.0, outcome_wait=15.0, verify_wait=5.0)
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    if fault in FLAKY:
        marks.append(pytest.mark.xfail(strict=False, reason=FLAKY[fault]))
    return pytest.param(cell, id=cell.name, marks=marks)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cell", [fast(*f) for f in FAST])
def test_fast_cell(cell: Cell) -> None:
    r = run_cell(cell)
    assert r.ok, f"{r.row()}\nlost, e.g.: {r.lost_examples}"
    assert r.seconds < 60, f"a fast cell took {r.seconds} s: {r.row()}"
