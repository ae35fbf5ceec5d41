"""The proxy package's module map (docs/proxy.md, "Modules"), checked on the sources: every module the
server runs on compiled, and the handled commands kept off the fast path. No import loop and no module
over 600 lines without its reason: tests/test_layers.py checks both for the whole package."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from durablecache.proxy.classify import FAST_NO
from durablecache.proxy.handlers import SPECIAL

ROOT = Path(__file__).resolve().parents[2]
PROXY = ROOT / "operator" / "durablecache" / "proxy"
# Imported by the server but run interpreted: the script checker runs once per distinct script body;
# members.MemberMark subclasses bytes, which mypyc cannot compile.
INTERPRETED = {"scripts", "members"}


def proxy_imports(path: Path) -> set[str]:
    """The modules of the proxy package that ``path`` imports, anywhere in it (TYPE_CHECKING blocks
    and function bodies too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return {name for name in found if (PROXY / f"{name}.py").is_file()}


def graph() -> dict[str, set[str]]:
    return {path.stem: proxy_imports(path) for path in PROXY.glob("*.py")}


def test_every_module_the_server_runs_on_is_compiled() -> None:
    compiled = set(re.findall(r'"operator/durablecache/proxy/(\w+)\.py"', (ROOT / "setup.py").read_text()))
    edges = graph()
    reached, todo = set(), ["server"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(edges[module])
    assert {"session", "upstream", "handlers"} <= reached
    assert reached - INTERPRETED <= compiled, sorted(reached - INTERPRETED - compiled)


def test_names_the_proxy_handles_stay_off_the_fast_path(source: Any, make_proxy: Any) -> None:
    """The handler table is consulted on the general path only (Session.dispatch): classification,
    from the server's own command table, keeps every name in it there — scripts excepted outside a
    migration, where they are not checked."""
    handled = set(SPECIAL)
    assert {b"auth", b"hello", b"multi", b"exec", b"subscribe", b"eval", b"flushall", b"copy"} <= handled
    migrating = make_proxy(source.endpoint())
    codes = migrating.call(lambda: {name: migrating.proxy.fastmap.classify(name) for name in handled})
    assert {name for name, code in codes.items() if code is not FAST_NO} == set(), codes
    plain = make_proxy(source.endpoint(), migrating=False)
    codes = plain.call(lambda: {name: plain.proxy.fastmap.classify(name) for name in handled})
    assert {name for name, code in codes.items() if code is not FAST_NO} == {b"eval_ro", b"evalsha_ro", b"fcall_ro",
                                                                            b"eval", b"evalsha", b"fcall"}
