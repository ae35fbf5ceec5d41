"""Rules for the modules compiled with mypyc (setup.py), checked on their sources."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILED = re.findall(r'"(operator/[\w/]+\.py)"', (ROOT / "setup.py").read_text())


def test_the_compiled_list_names_real_modules() -> None:
    assert len(COMPILED) >= 6 and all((ROOT / p).is_file() for p in COMPILED), COMPILED


def test_no_await_in_a_finally_block() -> None:
    """mypyc 2.4: a coroutine whose finally block holds an await leaves the exception it was unwinding
    (a cancellation, say) set as the thread's handled exception; a later await elsewhere then raised that
    stale CancelledError (found when tests after a MarkServer stop failed). Use except + re-raise."""
    found = []
    for path in COMPILED:
        tree = ast.parse((ROOT / path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and node.finalbody:
                for statement in node.finalbody:
                    for inner in ast.walk(statement):
                        if isinstance(inner, (ast.Await, ast.AsyncWith, ast.AsyncFor)):
                            found.append(f"{path}:{inner.lineno}")
    assert not found, found
