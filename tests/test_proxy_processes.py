"""Several proxy processes on one port (SO_REUSEPORT): `durablecache proxy --processes 2` has two
processes answer on the one port, each with its own admin port, restarts one that dies, stops both on
SIGTERM; and a migration whose two proxy processes share the port cuts over through both with no
acknowledged write lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.request
from typing import Any

import pytest
import valkey

from durablecache.migration import Migration, MigrationOptions
from durablecache.ports import free_port
from durablecache.proxyhandles import SubprocessProxy, subprocess_proxies
from durablecache.testing.waiting import wait_for
from durablecache.testing.workload import Workload, seed
from keyspace import CLI

pytestmark = pytest.mark.timeout(180)
PROBES = 30     # connections opened to see both processes answer: all on one is a 2**-29 chance


def admin_stats(port: int, token: str) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/stats", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def two_free_ports() -> int:
    """A port P with P+1 free too (the second process's admin port)."""
    for _ in range(50):
        port = free_port()
        if port < 65535:
            import socket
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise AssertionError("no two consecutive free ports")


def gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs nothing and holds no port)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_two_processes_answer_on_one_port_and_stop_together(source, tmp_path) -> None:
    token = "admin-secret"
    (tmp_path / "admin.token").write_text(token + "\n")
    os.chmod(tmp_path / "admin.token", 0o600)
    listen, admin = free_port(), two_free_ports()
    proc = subprocess.Popen(
        [*CLI, "proxy", "--processes", "2", "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
         "--admin-token-file", str(tmp_path / "admin.token"), "--max-clients", "100"],
        env={**os.environ, "DURABLECACHE_UPSTREAM": source.url()}, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert all("listening on" in line for line in lines), lines
        clients = [valkey.Valkey(port=listen, socket_timeout=10, single_connection_client=True)
                   for _ in range(PROBES)]
        for i, c in enumerate(clients):
            assert c.set(f"p:{i}", i)
        stats = [admin_stats(admin + i, token) for i in range(2)]
        assert stats[0]["pid"] != stats[1]["pid"]
        assert all(s["clients"] > 0 for s in stats), stats          # both processes answer
        assert sum(s["clients"] for s in stats) == PROBES
        assert all(s["max_clients"] == 100 for s in stats)          # the flags reach every process
        for c in clients:
            c.close()
        # One dies: the parent starts it again on the same port and admin port.
        os.kill(stats[1]["pid"], signal.SIGKILL)
        again = wait_for("the killed process to be restarted",
                         lambda: admin_stats(admin + 1, token)["pid"] != stats[1]["pid"], 30, ignore=(OSError,))
        assert again
        assert valkey.Valkey(port=listen, socket_timeout=10).get("p:0") == b"0"
        pids = [admin_stats(admin + i, token)["pid"] for i in range(2)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        for pid in pids:            # no child left behind
            wait_for(f"process {pid} to be gone", lambda pid=pid: gone(pid), 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_total_client_limit_is_shared_between_the_processes(source, tmp_path) -> None:
    """--max-clients-total 5 over 2 processes: 2 each (rounded down, never past the total), so of 8
    clients at most 4 are served and the others get the server's own error."""
    token = "admin-secret"
    (tmp_path / "admin.token").write_text(token + "\n")
    listen, admin = free_port(), two_free_ports()
    proc = subprocess.Popen(
        [*CLI, "proxy", "--processes", "2", "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
         "--admin-token-file", str(tmp_path / "admin.token"), "--max-clients-total", "5"],
        env={**os.environ, "DURABLECACHE_UPSTREAM": source.url()}, stdout=subprocess.PIPE, text=True)
    clients: list[valkey.Valkey] = []
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert all("listening on" in line for line in lines), lines
        assert [admin_stats(admin + i, token)["max_clients"] for i in range(2)] == [2, 2]
        served, refused = 0, []
        for _ in range(8):
            try:   # a single-connection client connects (and is refused) as it is made
                c = valkey.Valkey(port=listen, socket_timeout=10, single_connection_client=True)
                clients.append(c)
                served += bool(c.ping())
            except (valkey.ConnectionError, valkey.ResponseError) as exc:
                refused.append(str(exc))
        assert served <= 4 and len(refused) >= 4, (served, refused)
        assert all("max number of clients reached" in r for r in refused), refused
    finally:
        for c in clients:
            c.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_a_total_client_limit_smaller_than_the_processes_is_refused(source) -> None:
    out = subprocess.run([*CLI, "proxy", "--processes", "3", "--listen", f"127.0.0.1:{free_port()}",
                          "--max-clients-total", "2"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DURABLECACHE_UPSTREAM": source.url()})
    assert out.returncode != 0 and "cannot be shared by 3 processes" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_processes_need_a_fixed_port(source) -> None:
    out = subprocess.run([*CLI, "proxy", "--processes", "2", "--listen", "127.0.0.1:0"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "DURABLECACHE_UPSTREAM": source.url()})
    assert out.returncode != 0 and "--listen port other than 0" in out.stderr


def test_a_cutover_through_two_processes_on_one_port_loses_nothing(source, target) -> None:
    async def main() -> tuple[Workload, list[str], list[dict[str, Any]]]:
        with source.client() as c:
            seed(c, 3000)
        listen = free_port()
        load = Workload("127.0.0.1", source.port, writers=8, rate=400)
        load.start()
        events: list[dict[str, Any]] = []
        cut = asyncio.Event()

        def emit(e: dict[str, Any]) -> None:
            events.append(e)
            if e["event"] == "proxies":
                load.point_at("127.0.0.1", listen)
            if e["event"] == "cutover":
                cut.set()

        starter, owned = subprocess_proxies("127.0.0.1", listen, emit, processes=2)
        opts = MigrationOptions(gate_settle=0.5, gate_timeout=60, rollback_window=600, copy_concurrency=4)
        m = Migration(source.endpoint(), target.endpoint(), opts, starter, emit=emit)
        task = asyncio.create_task(m.run())
        try:
            await asyncio.wait([task, asyncio.create_task(cut.wait())], timeout=120,
                               return_when=asyncio.FIRST_COMPLETED)
            assert cut.is_set(), (task.exception() if task.done() else "no cutover in 120 s", events[-5:])
            children = [o for o in owned if isinstance(o, SubprocessProxy)]
            assert len(children) == 2 and len({c.pid for c in children}) == 2
            # Both processes answer on the one port (probes after the cutover: on the target now).
            probes = [valkey.Valkey(port=listen, socket_timeout=10, single_connection_client=True)
                      for _ in range(PROBES)]
            for i, c in enumerate(probes):
                await asyncio.to_thread(c.set, f"probe:{i}", i)
            stats = [await c._admin("GET", "/stats") for c in children]
            assert all(s["clients"] > 0 for s in stats), stats
            for c in probes:
                c.close()
            # Writes go on after the cutover, now landing on the target: 50 more acknowledged.
            await load.writes_go_on(50, 30)
            await load.finish()
            lost = load.lost(target.client())
            return load, lost, events
        finally:
            m.stop_requested.set()
            await asyncio.wait_for(task, 30)
            for thing in owned:
                await thing.stop()

    load, lost, events = asyncio.run(main())
    assert load.acked > 1000
    assert lost == []
    assert target.client().get("probe:0") == b"0"
    proxies = next(e for e in events if e["event"] == "proxies")
    assert len(proxies["addresses"]) == 2
