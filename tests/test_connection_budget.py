"""The connection budget as an option (`durablecache migrate --connection-budget`, `durablecache proxy
--connection-budget`, spec.proxy.connectionBudget): a cutover attempt that would take the target past it
is refused before anything is held, with an error that says why, and the migration goes on in Sync
(a refusal is not counted as a failed attempt); once the clients fit, the next attempt cuts over."""

from __future__ import annotations

import contextlib
import subprocess

import pytest
import valkey

from durablecache.ports import free_port
from durablecache.testing.workload import seed
from keyspace import CLI
from test_migrate import Events, control

BUDGET = 40
IDLE_CLIENTS = 50     # sessions through the proxy: the target's own clients plus these exceed BUDGET


def connected_clients(server) -> int:  # type: ignore[no-untyped-def]
    with contextlib.closing(server.client()) as c:
        return int(c.info("clients")["connected_clients"])


@pytest.mark.timeout(180)
def test_an_attempt_over_the_budget_is_refused_and_the_migration_goes_on(source, target, tmp_path) -> None:
    with contextlib.closing(source.client()) as client:   # left open, it would hold the gate
        seed(client, 500)
    listen, control_port = free_port(), free_port()
    token_file = tmp_path / "control.token"
    proc = subprocess.Popen(
        [*CLI, "migrate", "--source", source.url(), "--target", target.url(), "--listen", f"127.0.0.1:{listen}",
         "--proxy-mode", "subprocess", "--connection-budget", str(BUDGET), "--cutover", "manual",
         "--gate-settle", "0.3", "--exit-after-cutover", "--json",
         "--control", f"127.0.0.1:{control_port}", "--control-token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    events = Events(proc)
    idle: list[valkey.Valkey] = []
    try:
        child = events.wait(lambda e: e["event"] == "proxy_process")
        with open(f"/proc/{child['pid']}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert argv[argv.index(b"--connection-budget") + 1] == str(BUDGET).encode()   # reached the proxy
        writer = valkey.Valkey(port=listen, socket_timeout=10)
        for i in range(100):
            assert writer.set(f"via-proxy:{i}", i)
        events.wait(lambda e: e.get("event") == "awaiting_approval", 90)
        # Without the idle clients the attempt fits: the target's own clients and one session.
        assert connected_clients(target) + 1 < BUDGET
        for _ in range(IDLE_CLIENTS):
            c = valkey.Valkey(port=listen, socket_timeout=10, single_connection_client=True)
            assert c.ping()
            idle.append(c)
        control(control_port, token_file.read_text().strip(), "/approve")
        refused = events.wait(lambda e: e["event"] == "connection_budget", 60)
        assert "connection budget:" in refused["reason"] and f"more than its budget of {BUDGET}" in refused["reason"]
        assert "raise maxclients or the budget, or reduce clients" in refused["reason"]
        aborted = events.wait(lambda e: e["event"] == "cutover_aborted", 30)
        assert "connection budget" in aborted["reason"]
        # Refused before anything was held: the source is still authoritative and takes writes.
        assert writer.set("after-refusal", "1")
        status = control(control_port, token_file.read_text().strip(), "/status", method="GET")
        assert status["phase"] in ("Sync", "Cutover"), status
        # It tries again, and a refusal is not a failed attempt: the attempt number stays where it was
        # (otherwise the 20th refusal would fail the migration).
        again = events.wait(lambda e: e["event"] == "cutover_aborted", 30)
        assert "connection budget" in again["reason"]
        assert again["attempt"] == aborted["attempt"] == 1
        for c in idle:
            c.close()
        idle.clear()
        events.wait(lambda e: e["event"] == "cutover", 90)
        events.wait(lambda e: e["event"] == "phase" and e["phase"] == "Complete", 60)
        assert proc.wait(60) == 0
        writer.close()
    finally:
        for c in idle:
            c.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
    assert not any(e.get("event") == "phase" and e.get("phase") == "Failed" for e in events.seen)
    with contextlib.closing(target.client()) as t:
        assert t.dbsize() == 601 and t.get("after-refusal") == b"1"
