"""Client conformance: valkey-py's own test suite, against a server directly and through the proxy.

`make conformance` runs it. The `valkey` sdist on PyPI ships the client's test suite; it is downloaded
at the version constraints.txt pins (once, into ~/.cache/durablecache/conformance) and run twice per
mode: once against a Valkey 9 server (or 3-primary cluster) directly, once against the same kind of
server through `durablecache proxy`. A test that fails only through the proxy is a difference; every
difference must be listed, with its reason, in expected-differences.txt beside this file (each reason
is also in docs/limits.md). The run fails on an unlisted difference, and names listed ones that no
longer differ so the list stays true.

Modes: ``standalone`` (proxy outside a migration, ``--not-migrating``), ``cluster`` (the same against
a 3-primary cluster, the proxy presenting it as one node), ``migration`` (through the proxy of a
`durablecache migrate` in its Sync phase, Valkey 9 to Valkey 9: the suite's teardown deletes keys
instead of FLUSHDB, teardown_without_flush.py; after the suite the cutover is approved and both sides
must verify equal — valkey-py's whole suite as a write load that must lose nothing). What is run:
the synchronous test modules that need no Redis modules, no Sentinel, no TLS and no asyncio plugin
(LOCAL_FILES below).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from durablecache.ports import free_port
from durablecache.testing.localvalkey import LocalCluster, LocalServer, stop_process
from durablecache.testing.waiting import wait_listening

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: the fault suite's migration driver
from faults.fault_runner import MigrationRun, is_phase, verify  # noqa: E402

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected-differences.txt"
CACHE = Path(os.environ.get("DURABLECACHE_CACHE", Path.home() / ".cache" / "durablecache")) / "conformance"
# The client's synchronous suites; modules (bloom, json, search, timeseries, graph), Sentinel, TLS,
# multiprocessing and the asyncio suites need parts this run does not start.
LOCAL_FILES = ["test_commands.py", "test_pipeline.py", "test_pubsub.py", "test_scripting.py",
               "test_function.py", "test_lock.py", "test_encoding.py", "test_connection.py",
               "test_helpers.py", "test_cluster.py"]
PER_RUN_TIMEOUT = 1200   # one pytest run of the suite; it takes a few minutes on a quiet machine
MODES = ("standalone", "cluster", "migration")


@dataclass
class Outcome:
    passed: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    seconds: float = 0.0
    verified: str = ""      # migration mode: `durablecache verify` after the cutover


def suite_dir() -> Path:
    """The pinned sdist's tests, downloaded and unpacked once."""
    ver = version("valkey")
    root = CACHE / f"valkey-{ver}"
    if (root / "tests" / "conftest.py").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"valkey=={ver}", "-d", str(CACHE)], check=True, timeout=300)
    with tarfile.open(CACHE / f"valkey-{ver}.tar.gz") as tar:
        tar.extractall(CACHE, filter="data")
    return root


def run_suite(root: Path, url: str, mode: str, cluster_nodes: int, report: Path,
              only: list[str] | None = None) -> Outcome:
    """One pytest run of the client's suite against ``url`` (``only``: these test ids); outcomes by
    test id from its JUnit XML."""
    files = [f"tests/{f}" for f in LOCAL_FILES if (root / "tests" / f).exists()] if only is None \
        else [node_id(t) for t in only]
    marks = "not onlynoncluster" if mode == "cluster" else "not onlycluster"
    plugins = ["-p", "teardown_without_flush"] if mode == "migration" else []
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-p", "no:valkey",
           "-m", f"{marks} and not valkeymod and not ssl and not replica", f"--valkey-url={url}",
           f"--valkey-cluster-nodes={cluster_nodes}", f"--junitxml={report}", "-o", "addopts=",
           "--timeout=30", *plugins]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": f"{root}:{HERE}"}
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=PER_RUN_TIMEOUT, check=False)
    out = parse_junit(report)
    out.seconds = time.monotonic() - t0
    return out


def node_id(test: str) -> str:
    """JUnit's ``tests.test_commands.TestX::test_y`` as pytest's ``tests/test_commands.py::TestX::test_y``."""
    classname, _, name = test.partition("::")
    parts = classname.split(".")
    module = next(i for i in range(len(parts), 0, -1) if parts[i - 1].startswith("test_"))
    return "/".join(parts[:module]) + ".py::" + "::".join([*parts[module:], name])


def confirm(root: Path, url: str, mode: str, direct: Outcome, proxied: Outcome, work: Path,
            expected: dict[str, str]) -> None:
    """Run the unlisted proxy-only failures again, alone, through the proxy and then directly against
    a fresh server: one that passes through the proxy was a flake of the suite (timing); one that
    fails both ways alone depends on what ran before it in the suite, not on the proxy. Either is
    named, not counted; what fails only through the proxy when run alone is a difference."""
    suspects = sorted(proxied.failed - direct.failed - expected.keys())
    if not suspects or len(suspects) > 50:
        return
    again = run_suite(root, url, mode, 1, work / f"{mode}-confirm.xml", only=suspects)
    alone_direct = Outcome()
    still = sorted(again.failed)
    if still:
        with server("standalone" if mode == "migration" else mode) as (direct_url, nodes):
            alone_direct = run_suite(root, direct_url, mode, nodes, work / f"{mode}-confirm-direct.xml", only=still)
    for t in suspects:
        if t in again.passed:
            print(f"[{mode}] failed once through the proxy, passed when run again: {t}")
        elif t in alone_direct.failed:
            print(f"[{mode}] failed through the proxy in the suite; alone it fails directly too: {t}")
        else:
            continue
        proxied.failed.discard(t)
        proxied.passed.add(t)


def parse_junit(report: Path) -> Outcome:
    out = Outcome()
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            out.failed.add(name)
        elif "skipped" in kinds:
            out.skipped.add(name)
        else:
            out.passed.add(name)
    return out


def expected_differences() -> dict[str, dict[str, str]]:
    """mode -> test id -> reason, from lines ``mode test-id  # reason``."""
    table: dict[str, dict[str, str]] = {m: {} for m in MODES}
    for n, line in enumerate(EXPECTED.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\w+)\s+(\S+)\s+#\s*(.+)", line)
        if not m or m.group(1) not in table:
            raise SystemExit(f"{EXPECTED.name}:{n}: expected 'MODE TEST-ID  # reason', got {line!r}")
        table[m.group(1)][m.group(2)] = m.group(3)
    return table


@contextlib.contextmanager
def proxy_in_front(upstream: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "durablecache.cli", "proxy", "--upstream", upstream,
                             "--listen", f"127.0.0.1:{port}", "--not-migrating"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc, 30)
        yield f"valkey://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


@contextlib.contextmanager
def server(mode: str) -> Iterator[tuple[str, int]]:
    """A fresh Valkey 9 server (or 3-primary cluster): its URL and how many nodes a client will see."""
    extra = ["--enable-debug-command", "yes"]
    if mode == "standalone":
        s = LocalServer(engine="valkey9", extra=extra).start()
        try:
            yield f"valkey://127.0.0.1:{s.port}/0", 1
        finally:
            s.stop()
    else:
        c = LocalCluster(3, engine="valkey9", extra=extra).start()
        try:
            yield f"valkey://127.0.0.1:{c.primaries[0].port}/0", 3
        finally:
            c.stop()


def run_mode(root: Path, mode: str, work: Path, expected: dict[str, str]) -> tuple[Outcome, Outcome]:
    if mode == "migration":
        return run_migration(root, work, expected)
    with server(mode) as (url, nodes):
        print(f"[{mode}] directly against {url} ...", flush=True)
        direct = run_suite(root, url, mode, nodes, work / f"{mode}-direct.xml")
    with server(mode) as (url, _nodes), proxy_in_front(url) as via:
        print(f"[{mode}] through the proxy {via} ...", flush=True)
        proxied = run_suite(root, via, mode, 1, work / f"{mode}-proxy.xml")
        confirm(root, via, mode, direct, proxied, work, expected)
    return direct, proxied


def run_migration(root: Path, work: Path, expected: dict[str, str]) -> tuple[Outcome, Outcome]:
    """The suite directly against Valkey 9, then through a migrating proxy; cutover; verify equal."""
    with server("standalone") as (url, _nodes):
        print(f"[migration] directly against {url} ...", flush=True)
        direct = run_suite(root, url, "migration", 1, work / "migration-direct.xml")
    source = LocalServer(engine="valkey9", extra=["--enable-debug-command", "yes"]).start()
    target = LocalServer(engine="valkey9").start()
    run = MigrationRun(source.url(), target.url(), work).start()
    try:
        if run.wait(is_phase("Sync"), 120) is None:
            raise SystemExit(f"the migration did not reach Sync: {run.stderr_tail()}")
        via = f"valkey://127.0.0.1:{run.listen}/0"
        print(f"[migration] through the proxy of a migration in Sync {via} ...", flush=True)
        proxied = run_suite(root, via, "migration", 1, work / "migration-proxy.xml")
        confirm(root, via, "migration", direct, proxied, work, expected)
        run.control("/approve")
        done = run.wait(lambda e: e.get("event") == "cutover" or is_phase("Failed")(e), 120)
        if done is None or done.get("event") != "cutover":
            raise SystemExit(f"no cutover after the suite: {done} {run.stderr_tail()}")
        proxied.verified = verify(source, target)
        print(f"[migration] cutover after the suite; source against target: {proxied.verified}")
    finally:
        run.stop()
        source.stop()
        target.stop()
    return direct, proxied


def compare(mode: str, direct: Outcome, proxied: Outcome, expected: dict[str, str]) -> list[str]:
    """Print the mode's counts and differences; the problems that fail the run."""
    only_proxy = proxied.failed - direct.failed
    only_direct = direct.failed - proxied.failed
    print(f"[{mode}] direct: {len(direct.passed)} passed, {len(direct.failed)} failed, "
          f"{len(direct.skipped)} skipped ({direct.seconds:.0f} s); through the proxy: "
          f"{len(proxied.passed)} passed, {len(proxied.failed)} failed, {len(proxied.skipped)} skipped "
          f"({proxied.seconds:.0f} s); failing only through the proxy: {len(only_proxy)} "
          f"({len(only_proxy & expected.keys())} listed as expected)")
    problems = [f"{mode}: {t} fails only through the proxy and is not in {EXPECTED.name}"
                for t in sorted(only_proxy - expected.keys())]
    for t in sorted(expected.keys() - only_proxy):
        print(f"[{mode}] listed but no longer a difference: {t} ({expected[t]})")
    for t in sorted(only_direct):
        print(f"[{mode}] fails directly but not through the proxy: {t}")
    if proxied.verified not in ("", "equal"):
        problems.append(f"{mode}: after the suite and the cutover the sides differ: {proxied.verified}")
    if not direct.passed or not proxied.passed:
        problems.append(f"{mode}: a run passed nothing: the suite did not run")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=[*MODES, "all"], default="all")
    ap.add_argument("--keep", type=Path, help="keep the JUnit reports in this directory")
    args = ap.parse_args()
    root = suite_dir()
    expected = expected_differences()
    work = args.keep or Path(os.environ.get("TMPDIR", "/tmp")) / f"durablecache-conformance-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    try:
        for mode in MODES if args.mode == "all" else (args.mode,):
            direct, proxied = run_mode(root, mode, work, expected[mode])
            problems += compare(mode, direct, proxied, expected[mode])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for p in problems:
        print(f"PROBLEM {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
