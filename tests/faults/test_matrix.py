"""Every cell of the fault matrix as a pytest test, deselected unless run with ``-m faults`` (the same
cells as ``tests/faults/matrix.py``, which prints the table instead)."""

from __future__ import annotations

import pytest
from fault_cells import Cell, all_cells, run_cell


@pytest.mark.faults
@pytest.mark.timeout(300)
@pytest.mark.parametrize("cell", all_cells(), ids=lambda c: c.name)
def test_cell(cell: Cell) -> None:
    r = run_cell(cell)
    assert r.ok, f"{r.row()}\nexamples: {r.lost_examples}"
