"""The fast subset of the fault matrix, run by plain pytest (and so by `make test`): five cells, each a
real `durablecache migrate` child process under ledger write load, each under 30 s, on servers that
refuse what ElastiCache refuses (fault_cells.RESTRICTED, checked at the start of every cell).

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
    ("EVAL flushdb", "Sync", None),
]


def fast(fault: str, phase: str, xfail: str | None) -> object:
    cell = dataclasses.replace(find(fault, phase), refuse_wait=8.0, outcome_wait=15.0, verify_wait=5.0)
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(cell, id=cell.name, marks=marks)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cell", [fast(*f) for f in FAST])
def test_fast_cell(cell: Cell) -> None:
    r = run_cell(cell)
    assert r.ok, f"{r.row()}\nlost, e.g.: {r.lost_examples}"
    assert r.seconds < 60, f"a fast cell took {r.seconds} s: {r.row()}"
