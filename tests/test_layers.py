"""The package's layers, as docs/architecture.md draws them, checked on the source (static imports,
including those inside functions): the engine imports nothing of Kubernetes (kopf, the client, k8s/),
of the cloud (providers/, boto3) or of the command line; providers know only endpoints and errors;
k8s/ never imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "operator" / "durablecache"
OUTSIDE_ENGINE = ("k8s", "commands", "cli", "providers")
KUBERNETES = ("kopf", "kubernetes")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from . import x`` gives ``pkg.x`` too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def reachable(start: str) -> set[str]:
    """Every module ``start`` imports, directly or through the package's own modules."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in GRAPH.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def engine_modules() -> list[str]:
    return sorted(m for m in GRAPH if m != "durablecache" and layer(m) not in OUTSIDE_ENGINE)


# ElastiCache IAM authentication is how a connection logs in (resp.Connection), like TLS: its token is
# signed with botocore's SigV4 signer. The one exception to "no cloud library in the engine", and only
# inside its functions, so the engine imports without botocore (test below).
AUTH_SIGNER = "durablecache.iamauth"


def test_the_engine_imports_nothing_of_kubernetes_the_cloud_or_the_command_line() -> None:
    assert "durablecache.migration" in engine_modules() and "durablecache.proxy.server" in engine_modules()
    bad = {}
    signer = {d for d in GRAPH[AUTH_SIGNER] if d.split(".")[0] == "botocore"}
    for module in engine_modules():
        leaks = {d for d in reachable(module) - signer
                 if d.split(".")[0] in (*KUBERNETES, "boto3", "botocore")
                 or (d.startswith("durablecache.") and layer(d) in OUTSIDE_ENGINE)}
        if leaks:
            bad[module] = sorted(leaks)
    assert not bad, bad


def test_providers_and_k8s_stay_in_their_lanes() -> None:
    for module in GRAPH:
        deps = {d for d in GRAPH[module] if d.startswith("durablecache.")}
        if layer(module) == "providers":
            assert {layer(d) for d in deps} <= {"providers", "urls", "errors", "logs", ""}, (module, deps)
        if layer(module) == "k8s":
            assert not {d for d in deps if layer(d) in ("commands", "cli")}, (module, deps)


def test_the_checker_sees_a_leak() -> None:
    """The graph is read the way the checks above need: the worker, which is not the engine, does
    reach Kubernetes through k8s/."""
    assert "kubernetes" in reachable("durablecache.commands.worker")
    assert "durablecache.k8s.kube" in reachable("durablecache.commands.worker")


def test_the_iam_signer_imports_botocore_only_when_it_signs() -> None:
    tree = ast.parse((PACKAGE / "iamauth.py").read_text())
    top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert not {m for m in top if m.split(".")[0] in ("botocore", "boto3")}, top


def test_only_the_command_line_imports_the_test_kit() -> None:
    """durablecache/testing/ (local servers, the ledger workload, bounded waits) ships for the demo,
    the tests and the benchmarks; the engine, the operator and the providers run without it."""
    users = {module for module in GRAPH if layer(module) not in ("testing", "commands")
             and any(layer(d) == "testing" for d in GRAPH[module] if d.startswith("durablecache."))}
    assert not users, sorted(users)
    assert "durablecache.testing.localvalkey" in reachable("durablecache.commands.demo")


def own_module(name: str) -> str | None:
    """The package's Python module ``name`` is or names a member of; None for a compiled C module
    (proxy/_resp: it imports nothing of ours)."""
    if name in GRAPH:
        return name
    if (PACKAGE.parent / name.replace(".", "/")).with_suffix(".pyi").exists():
        return None
    return name.rpartition(".")[0]


def package_edges() -> dict[str, set[str]]:
    """Module -> the package's own modules it imports (``from . import x`` resolved to the module x).
    A module's own enclosing packages are left out: ``from . import x`` names its package only to
    reach x, and Python runs that ``__init__`` first in any case."""
    edges: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        own = {own_module(d) for d in deps if d.startswith("durablecache.")}
        edges[module] = {d for d in own if d is not None and d != module and not module.startswith(f"{d}.")}
    return edges


def import_loop(edges: dict[str, set[str]]) -> list[str]:
    """One loop in ``edges`` (its modules, the first repeated at the end), or [] when there is none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return []
        for imported in sorted(edges.get(module, ())):
            if loop := visit(imported, [*path, module]):
                return loop
        done.add(module)
        return []

    return next((loop for module in sorted(edges) if (loop := visit(module, []))), [])


def test_the_package_has_no_import_loop() -> None:
    """Function-level and type-only imports count: a loop is one to a reader as to a structure tool."""
    assert not (loop := import_loop(package_edges())), " -> ".join(loop)


def test_the_loop_checker_sees_a_loop() -> None:
    assert import_loop({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert import_loop({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    # The graph resolves ``from . import x`` to the module x, and leaves out the package itself.
    edges = package_edges()["durablecache.proxy.clusterwide"]
    assert "durablecache.proxy.clients" in edges and "durablecache.proxy" not in edges


def test_long_modules_say_why_at_their_top() -> None:
    long = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
            if len(path.read_text().splitlines()) > 600 and "over 600 lines" not in path.read_text()[:2000].lower()]
    assert not long, long
