"""What the container image runs, tested without a Docker engine.

The Dockerfile builds the durablecache wheel from its build context (what .dockerignore lets through),
installs it with ``pip install --constraint constraints.txt`` into a fresh virtualenv and runs
``durablecache`` as a non-root user with the role as its argument. These tests do the same steps on
this machine: the same build context, the same wheel, the same pinned install into a new venv (not
the development venv, not the source tree), then the roles the Dockerfile and the chart start --
including a ``durablecache proxy`` from that venv forwarding a real client to a real valkey-server.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import valkey

from durablecache.testing.localvalkey import LocalServer

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
# Building the wheel (its proxy modules compiled with mypyc) and resolving every pinned dependency into
# a new venv takes 2-5 minutes on this 2-core machine, more when it is busy: the session fixture's first
# user gets room for all three steps (the suite-wide 300 s timed it out once under load, and a failed
# session fixture is built again by every test that uses it).
INSTALL_TIMEOUT = 600
COMMAND_TIMEOUT = 60
pytestmark = pytest.mark.timeout(3 * INSTALL_TIMEOUT)


# -- the Docker build context ----------------------------------------------------------------------
def _dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str], str]]:
    """(negated, regex, pattern) per .dockerignore line, in order: the last match wins, like Docker."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):  # "a/**/b" also matches "a/b"
                    regex = regex[:-2] + "(.*/)?"
                    i += 1
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negated, re.compile(regex + r"\Z"), pattern))
    return rules


def _excluded(rel: str, rules: list[tuple[bool, re.Pattern[str], str]]) -> bool:
    """Docker: a pattern that matches a parent directory matches everything below it."""
    parts = rel.split("/")
    excluded = False
    for negated, regex, _ in rules:
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def build_context(dest: Path) -> list[str]:
    """Copy the files `docker build .` would send (per .dockerignore) into dest; return them."""
    rules = _dockerignore_rules(ROOT / ".dockerignore")
    reincluded = [p for neg, _, p in rules if neg]
    copied = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        rel_dir = "" if rel_dir == "." else rel_dir
        # Prune excluded directories nothing is re-included from (.git, .venv, tools/k8s caches ...).
        keep = []
        for d in dirnames:
            rel = f"{rel_dir}/{d}" if rel_dir else d
            if _excluded(rel, rules) and not any(p.startswith(rel + "/") or p == rel for p in reincluded):
                continue
            keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            rel = f"{rel_dir}/{f}" if rel_dir else f
            if not _excluded(rel, rules):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
                copied.append(rel)
    return sorted(copied)


# -- the image's venv, built once per test session ---------------------------------------------------
def _run(cmd: list[str], timeout: float = COMMAND_TIMEOUT, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's build stage, on this machine: wheel from the build context, fresh venv, pinned install."""
    base = tmp_path_factory.mktemp("image")
    context, dist, venv = base / "context", base / "dist", base / "venv"
    context.mkdir()
    files = build_context(context)
    assert "pyproject.toml" in files and "constraints.txt" in files, files
    assert not any(f.startswith(("tests/", ".venv/", ".git/")) for f in files), "build context leaks dev files"
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dist), str(context)],
                 timeout=INSTALL_TIMEOUT, env=pip_env)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels = list(dist.glob("durablecache-*.whl"))
    assert len(wheels) == 1, wheels
    made = _run([sys.executable, "-m", "venv", str(venv)], timeout=INSTALL_TIMEOUT)
    assert made.returncode == 0, made.stderr
    installed = _run([str(venv / "bin" / "pip"), "install", "--constraint", str(context / "constraints.txt"),
                      str(wheels[0])], timeout=INSTALL_TIMEOUT, env=pip_env)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return venv


def image_env(venv: Path, home: Path) -> dict[str, str]:
    """The runtime stage's ENV: the venv first on PATH, HOME=/tmp (here: a temp dir), no bytecode writes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", HOME=str(home),
               PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def role(image_venv: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `durablecache ARGS` as the image's ENTRYPOINT does: from the image venv, outside the source tree."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _run([str(image_venv / "bin" / "durablecache"), *args], env=image_env(image_venv, tmp_path),
                    cwd=tmp_path)

    return run


# -- the Dockerfile itself ------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def test_dockerfile_runs_durablecache_as_non_root() -> None:
    final = _final_stage()
    entrypoints = [json.loads(a) for w, a in final if w == "ENTRYPOINT"]
    cmds = [json.loads(a) for w, a in final if w == "CMD"]
    users = [a for w, a in final if w == "USER"]
    # Exec form (JSON) so signals reach durablecache itself, not a shell.
    assert entrypoints == [["durablecache"]]
    assert cmds == [["operator"]]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    # Numeric: Kubernetes' runAsNonRoot can only verify a numeric USER.
    assert uid.isdigit() and int(uid) != 0, users
    assert not gid or (gid.isdigit() and int(gid) != 0), users
    # The USER is the one the chart's securityContext runs as.
    chart = (ROOT / "charts/durablecache-operator/templates/deployment.yaml").read_text()
    assert f"runAsUser: {int(uid)}" in chart


def test_dockerfile_installs_the_wheel_with_the_pinned_constraints() -> None:
    runs = " ".join(a for w, a in _instructions() if w == "RUN")
    assert re.search(r"pip wheel --no-deps .* \.", runs), runs
    assert re.search(r"pip install (--constraint|-c) constraints\.txt \S*durablecache-\S*\.whl", runs), runs
    # The build stage has the C compiler that setup.py's mypyc build needs (python:*-slim has none).
    assert re.search(r"apt-get install .*\bgcc\b", runs), runs
    # The base image's Python is the one pyproject.toml allows.
    base = next(a for w, a in _instructions() if w == "ARG" and a.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.(1[1-9])-slim", base), base


def test_the_chart_and_the_operator_start_roles_the_image_has(image_venv: Path) -> None:
    """The chart's Deployment runs `durablecache ... operator ...`; the operator's worker pods run
    `durablecache ... worker ...` from the same image: both roles must exist in the installed CLI."""
    out = _run([str(image_venv / "bin" / "durablecache"), "--help"], cwd=image_venv)
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"^ {4}(\w+) ", out.stdout, re.M))
    chart = (ROOT / "charts/durablecache-operator/templates/deployment.yaml").read_text()
    assert "command: [durablecache]" in chart
    assert re.search(r"^\s+- operator$", chart, re.M)
    assert {"operator", "proxy", "migrate", "copy", "verify"} <= listed, listed
    # The worker Deployment the operator creates: command [durablecache], args [global options..., role, ...].
    from durablecache.k8s.runner import worker_args

    args = worker_args({"metadata": {"namespace": "shop", "name": "sessions"}}, "0.0.0.0:6379")
    worker_role = next(a for a in args if not a.startswith("-"))
    assert worker_role in listed, (worker_role, listed)


# -- the installed image venv -------------------------------------------------------------------------
@pytest.mark.slow
def test_installed_package_is_the_wheel_not_the_source_tree(image_venv: Path, tmp_path: Path) -> None:
    py = str(image_venv / "bin" / "python")
    # Import every module: a dependency missing from pyproject.toml (present only in the dev venv)
    # fails here, not in a pod. --help of a role imports only its argument parser.
    code = ("import durablecache, importlib, pkgutil; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(durablecache.__path__, 'durablecache.')]; "
            "print(durablecache.__file__); "
            "print(*(importlib.import_module(f'durablecache.proxy.{m}').__file__ for m in "
            "('session', 'server', 'framing', 'marks', 'commandtable', 'cluster', '_resp')))")
    out = _run([py, "-c", code], env=image_env(image_venv, tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    package, compiled = out.stdout.strip().splitlines()
    assert Path(package).resolve().is_relative_to(image_venv.resolve()), out.stdout
    # The proxy's modules are the wheel's compiled extensions (mypyc, and _resp.c), not .py sources.
    assert all(f.endswith(".so") for f in compiled.split()), compiled
    # Test-only packages are pinned in constraints.txt but must not be installed into the image.
    listed = _run([str(image_venv / "bin" / "pip"), "list", "--format=json"], cwd=tmp_path)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"kopf", "boto3", "valkey", "libvalkey", "structlog", "aiohttp", "prometheus-client"} <= names
    test_only = {"pytest", "moto", "ruff", "valkey-glide", "mypy"}
    assert not names & test_only, names & test_only


@pytest.mark.slow
def test_version_role(role: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    out = role("--version")
    assert out.returncode == 0, out.stderr
    import durablecache

    assert out.stdout.strip() == f"durablecache {durablecache.__version__}"


@pytest.mark.slow
@pytest.mark.parametrize("name, flags", [
    ("operator", ["--peering", "--standalone", "--all-namespaces", "--namespace", "--health-port", "--metrics-port"]),
    ("proxy", ["--upstream", "--listen", "--admin", "--marks-to", "--tls-cert"]),
    ("migrate", ["--source", "--target", "--listen", "--cutover", "--max-write-pause", "--rollback-window"]),
    ("worker", ["--resource", "--listen"]),
])
def test_role_help(role: Callable[..., subprocess.CompletedProcess[str]], name: str, flags: list[str]) -> None:
    out = role(name, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: durablecache {name} ")
    for flag in flags:
        assert flag in out.stdout, f"{flag} missing from `durablecache {name} --help`"


@pytest.mark.slow
def test_role_error_is_one_line_not_a_traceback(role: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    out = role("proxy", "--upstream", "valkey://127.0.0.1:6379", "--listen", "nonsense")
    assert out.returncode == 2
    assert out.stderr.strip() == "durablecache proxy: error: --listen must be HOST:PORT, not 'nonsense'"


@pytest.fixture
def image_proxy(image_venv: Path, tmp_path: Path, make_server: Callable[..., LocalServer]
                ) -> Iterator[tuple[subprocess.Popen[str], LocalServer, int]]:
    """`durablecache proxy` from the image venv in front of a real valkey-server."""
    server = make_server()
    proc = subprocess.Popen(
        [str(image_venv / "bin" / "durablecache"), "proxy", "--upstream", f"valkey://127.0.0.1:{server.port}",
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=image_env(image_venv, tmp_path), cwd=tmp_path)
    try:
        port = _listening_port(proc, timeout=30)
        yield proc, server, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _listening_port(proc: subprocess.Popen[str], timeout: float) -> int:
    """The port from 'durablecache proxy: listening on 127.0.0.1:PORT -> ...'."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            found = re.search(r"listening on 127\.0\.0\.1:(\d+) ->", line)
            if found:
                return int(found.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
    raise AssertionError(f"proxy did not report its port within {timeout}s")


def _roundtrip(port: int, payload: bytes, expect: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        deadline = time.monotonic() + timeout
        # Until the reply is complete: at least as long as expected and ending a RESP line.
        while (len(data) < len(expect) or not data.endswith(b"\r\n")) and time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


@pytest.mark.slow
def test_proxy_role_serves_clients_through_to_a_real_server(
        image_proxy: tuple[subprocess.Popen[str], LocalServer, int]) -> None:
    proc, server, port = image_proxy
    assert _roundtrip(port, b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n") == b"+PONG\r\n"
    # A write through the proxy lands on the server behind it, and a read comes back through it.
    assert _roundtrip(port, b"*3\r\n$3\r\nSET\r\n$5\r\nimage\r\n$2\r\nok\r\n", b"+OK\r\n") == b"+OK\r\n"
    direct = valkey.Valkey(host="127.0.0.1", port=server.port, socket_timeout=5)
    try:
        assert direct.get("image") == b"ok"
        direct.set("image", "from-server")
    finally:
        direct.close()
    get = b"*2\r\n$3\r\nGET\r\n$5\r\nimage\r\n"
    assert _roundtrip(port, get, b"$11\r\nfrom-server\r\n") == b"$11\r\nfrom-server\r\n"
    # During a migration the proxy refuses what it cannot track, with its own error.
    refused = _roundtrip(port, b"*1\r\n$8\r\nFLUSHALL\r\n", b"-ERR durablecache")
    assert refused.startswith(b"-ERR durablecache: FLUSHALL is refused during a migration"), refused
    # The kubelet stops a pod with SIGTERM: the role exits cleanly and promptly.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
