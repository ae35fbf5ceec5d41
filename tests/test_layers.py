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
