"""Drive a real `durablecache migrate --json` child process for the fault matrix: read its JSON events
line by line (bounded waits, never fixed sleeps), talk to its control API, kill and restart it with
the same state file; restart valkey servers on the same port, empty or with their data."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import valkey

import durablecache
from durablecache.ports import free_port
from durablecache.testing.localvalkey import START_TIMEOUT, LocalServer, stop_process

CLI = [sys.executable, "-m", "durablecache.cli"]
# Children run the same durablecache as this process (this checkout's, not an editable install's).
_PKG_ROOT = str(Path(durablecache.__file__).resolve().parents[1])
CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1",
             "PYTHONPATH": os.pathsep.join(p for p in (_PKG_ROOT, os.environ.get("PYTHONPATH", "")) if p)}
Event = dict[str, Any]
Pred = Callable[[Event], bool]


def is_event(*names: str) -> Pred:
    return lambda e: e.get("event") in names


def is_phase(*names: str) -> Pred:
    return lambda e: e.get("event") == "phase" and e.get("phase") in names


class MigrationRun:
    """One migration, possibly over several processes (killed and restarted from its state file)."""

    def __init__(self, source_url: str, target_url: str, workdir: Path, extra: list[str] | None = None):
        self.listen = free_port()
        self.control_port = free_port()
        self.workdir = workdir
        self.token_file = workdir / "token"
        self.state_file = workdir / "state.json"
        self.args = [*CLI, "migrate", "--source", source_url, "--target", target_url,
                     "--listen", f"127.0.0.1:{self.listen}", "--cutover", "manual",
                     "--control", f"127.0.0.1:{self.control_port}", "--control-token-file", str(self.token_file),
                     "--json", "--state-file", str(self.state_file), "--gate-settle", "0.5s",
                     "--gate-timeout", "60s", *(extra or [])]
        self.procs: list[subprocess.Popen[str]] = []
        self.events: list[Event] = []
        self.cursor = 0
        self._cv = threading.Condition()

    # -- process ----------------------------------------------------------------------------------
    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.procs[-1]

    def start(self) -> MigrationRun:
        n = len(self.procs)
        stderr = open(self.workdir / f"stderr.{n}", "w")  # noqa: SIM115 - closed by the child's exit
        proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=CHILD_ENV,
                                start_new_session=True)
        stderr.close()
        self.procs.append(proc)
        self._append({"event": "_started", "n": n})
        threading.Thread(target=self._read, args=(proc, n), daemon=True).start()
        return self

    def _append(self, e: Event) -> None:
        with self._cv:
            e.setdefault("_t", time.monotonic())
            self.events.append(e)
            self._cv.notify_all()

    def _read(self, proc: subprocess.Popen[str], n: int) -> None:
        assert proc.stdout
        for line in proc.stdout:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    self._append(json.loads(line))
        proc.wait()
        self._append({"event": "_exited", "n": n, "rc": proc.returncode})

    def kill(self) -> None:
        """SIGKILL: the process, its proxy and its in-memory marks are gone at once."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p, 20)

    def stderr_tail(self, chars: int = 300) -> str:
        out = []
        for n in range(len(self.procs)):
            f = self.workdir / f"stderr.{n}"
            if f.exists():
                text = "\n".join(x for x in f.read_text().splitlines() if "durablecache" in x and "error" in x)
                if text:
                    out.append(text[-chars:])
        return " | ".join(out)

    # -- events -----------------------------------------------------------------------------------
    def wait(self, pred: Pred, timeout: float) -> Event | None:
        """The next event (from the cursor on) matching ``pred``, or None after ``timeout`` seconds or
        once the current process exited without it."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                while self.cursor < len(self.events):
                    e = self.events[self.cursor]
                    self.cursor += 1
                    if pred(e):
                        return e
                    if e.get("event") == "_exited" and e.get("n") == len(self.procs) - 1:
                        return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(min(left, 0.5))

    def mark(self) -> int:
        with self._cv:
            return len(self.events)

    def since(self, index: int) -> list[Event]:
        with self._cv:
            return list(self.events[index:])

    def seen(self, pred: Pred, since: int = 0) -> Event | None:
        return next((e for e in self.since(since) if pred(e)), None)

    # -- control API ------------------------------------------------------------------------------
    def control(self, path: str, method: str = "POST") -> dict[str, Any]:
        token = self.token_file.read_text().strip() if self.token_file.exists() else ""
        req = urllib.request.Request(f"http://127.0.0.1:{self.control_port}{path}", method=method,
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as exc:
            return {"http_error": exc.code, **json.loads(exc.read() or b"{}")}
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return {"http_error": str(exc)}

    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return {}


# -- servers --------------------------------------------------------------------------------------
def aof_server(engine: str, elasticache: bool = False) -> LocalServer:
    """A server that keeps its data across a restart: AOF, fsync always (later arguments win)."""
    return LocalServer(engine=engine, elasticache=elasticache, extra=["--appendonly", "yes", "--appendfsync", "always"])


def kill_server(server: LocalServer) -> float:
    """SIGKILL the server process (no shutdown save); its directory stays. Returns when it was sent."""
    at = time.monotonic()
    if server.proc and server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)
    return at


def restart_server(server: LocalServer, *, keep_data: bool) -> float:
    """Start the server again on the same port. keep_data=False: its files are removed first, so it
    comes back empty (as a cache node replaced after a crash); True: it reloads its AOF. Returns when
    the kill was sent."""
    killed_at = kill_server(server)
    if not keep_data:
        for entry in Path(server.dir).iterdir():
            if entry.name != "server.log":
                if entry.is_dir():
                    for sub in entry.iterdir():
                        sub.unlink()
                    entry.rmdir()
                else:
                    entry.unlink()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:  # the port was just released; a bind may briefly fail
        server.proc = subprocess.Popen(server.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if server._wait_ready():
            return killed_at
        kill_server(server)
        time.sleep(0.2)
    raise RuntimeError(f"valkey-server on port {server.port} did not restart")


def verify(source: LocalServer, target: LocalServer, timeout: float = 20.0) -> str:
    """`durablecache verify` of the two servers, repeated until equal or ``timeout`` (the syncer may
    still be copying the writers' last keys): 'equal', or the first line of its report."""
    deadline = time.monotonic() + timeout
    line = "not run"
    while True:
        try:
            res = subprocess.run([*CLI, "verify", "--source", source.url(), "--target", target.url()],
                                 capture_output=True, text=True, env=CHILD_ENV,
                                 timeout=max(5.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return "verify timed out"
        if res.returncode == 0:
            return "equal"
        line = (res.stdout.strip().splitlines() or res.stderr.strip().splitlines() or ["?"])[0]
        if res.returncode != 1:
            return f"error: {line}"
        if time.monotonic() > deadline:
            return line
        time.sleep(0.5)


def client(server: LocalServer) -> valkey.Valkey:
    return server.client(socket_timeout=10)
