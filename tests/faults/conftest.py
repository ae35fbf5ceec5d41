"""The fault-injection suite (docs/reliability.md). Its helpers live next to the tests and are imported
by module name (pytest puts this directory on sys.path, as matrix.py does for itself).

The whole matrix runs from ``tests/faults/matrix.py`` (``make faults``); under pytest only the fast
subset runs by default. ``test_matrix.py``'s cells carry the ``faults`` marker and are deselected unless
selected with ``-m faults``."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: a cell of the full fault matrix (slow; run with -m faults "
                                       "or tests/faults/matrix.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselected, not skipped: a plain run does not run them and says so in its "deselected" count,
    rather than reporting them as tests that were skipped."""
    if "faults" in (config.option.markexpr or ""):
        return
    matrix = [item for item in items if item.get_closest_marker("faults")]
    if matrix:
        config.hook.pytest_deselected(items=matrix)
        items[:] = [item for item in items if not item.get_closest_marker("faults")]
