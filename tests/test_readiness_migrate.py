"""`durablecache migrate` from a cluster-mode-disabled source into a cluster-mode target: the control
API's `status` names the standalone-mode client that writes through the proxy (the readiness report),
and after Complete the proxy stays in front of the target as a plain front end (afterCutover proxy,
the CLI's default) — the same unchanged standalone client keeps working, also through a proxy
restarted after the end, which then carries no marks."""

from __future__ import annotations

import contextlib
import json
import subprocess
from typing import Any

import pytest
import valkey

from durablecache.ports import free_port
from durablecache.testing.localvalkey import stop_process
from durablecache.testing.waiting import wait_for
from durablecache.testing.workload import seed
from keyspace import CLI, run_cli
from test_migrate import Events

pytestmark = pytest.mark.timeout(240)


def status(control_port: int, token_file: str) -> dict[str, Any]:
    res = run_cli("control", "status", "--control", f"127.0.0.1:{control_port}", "--control-token-file", token_file)
    assert res.returncode == 0, res
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def test_control_status_names_standalone_clients_and_the_proxy_serves_them_after_complete(
        make_server, make_cluster, tmp_path):
    source = make_server()
    target = make_cluster(primaries=3)
    with contextlib.closing(source.client()) as client:
        seed(client, 500)
    listen, control_port = free_port(), free_port()
    token_file = str(tmp_path / "token")
    proc = subprocess.Popen(
        [*CLI, "migrate", "--source", source.url(), "--target", target.url(),
         "--listen", f"127.0.0.1:{listen}", "--proxy-mode", "subprocess", "--cutover", "manual",
         "--gate-settle", "0.3", "--rollback-window", "1s", "--json",
         "--control", f"127.0.0.1:{control_port}", "--control-token-file", token_file],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    events = Events(proc)
    try:
        events.wait(lambda e: e["event"] == "proxies", 60)
        app = valkey.Valkey(port=listen, socket_timeout=10, lib_name="shop-cart", lib_version="1.4.2")
        app.set("cart:1", "apples")
        events.wait(lambda e: e["event"] == "awaiting_approval", 120)

        def named() -> dict[str, Any] | None:
            clients = status(control_port, token_file).get("clients") or {}
            return clients if any("shop-cart 1.4.2" in p for p in clients.get("problems", [])) else None
        clients = wait_for("the readiness report in control status", named, 60)
        assert clients["ready"] is False and clients["standaloneConnections"] >= 1
        [problem] = [p for p in clients["problems"] if "shop-cart" in p]
        assert "standalone-mode clients" in problem and "cluster-mode endpoint" in problem
        assert [g for g in clients["groups"] if g["lib"] == "shop-cart"][0]["mode"] == "standalone"
        said = next((e for e in events.seen if e["event"] == "readiness"), None) or \
            events.wait(lambda e: e["event"] == "readiness", 30)
        assert said["ready"] is False

        run_cli("control", "approve", "--control", f"127.0.0.1:{control_port}", "--control-token-file", token_file)
        events.wait(lambda e: e["event"] == "cutover", 90)
        # RouteOut: reverse sync still runs, a write through the proxy reaches the source too.
        app.set("cart:routeout", "pears")
        wait_for("reverse sync in RouteOut", lambda: source.client().get("cart:routeout") == b"pears", 30)
        events.wait(lambda e: e["event"] == "phase" and e["phase"] == "Complete", 60)
        events.wait(lambda e: e["event"] == "serving", 30)
        # Complete, afterCutover proxy: the unchanged standalone client keeps working, on the target.
        app.set("cart:after", "plums")
        assert app.get("cart:after") == b"plums" and app.get("cart:1") == b"apples"
        direct = target.cluster_client()
        assert direct.get("cart:after") == b"plums"
        after = status(control_port, token_file)
        assert after["phase"] == "Complete" and after["syncer"] == {}     # no syncer any more
        assert source.client().get("cart:after") is None     # nothing copies back once it ended

        # A proxy process restarted after the end serves without marks.
        child = next(e for e in reversed(events.seen) if e["event"] == "proxy_process")
        proc_pid = child["pid"]
        subprocess.run(["kill", "-9", str(proc_pid)], check=True)
        restarted = events.wait(lambda e: e["event"] == "proxy_process" and e.get("pid") != proc_pid, 60)
        with open(f"/proc/{restarted['pid']}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"--not-migrating" in argv and b"--marks-to" not in argv
        again = valkey.Valkey(port=listen, socket_timeout=10, lib_name="shop-cart", lib_version="1.4.2")
        wait_for("the restarted proxy answers", lambda: _pings(again), 30)
        again.set("cart:restarted", "figs")
        assert direct.get("cart:restarted") == b"figs"
    finally:
        stop_process(proc, 30)


def _pings(c: valkey.Valkey) -> bool:
    try:
        return bool(c.ping())
    except valkey.ConnectionError:
        return False


def test_after_cutover_target_stops_the_proxy_and_exits_once_complete(source, target):
    with contextlib.closing(source.client()) as client:
        seed(client, 200)
    listen = free_port()
    res = subprocess.run([*CLI, "migrate", "--source", source.url(), "--target", target.url(), "--listen",
                          f"127.0.0.1:{listen}", "--gate-settle", "0.2", "--rollback-window", "0.5s",
                          "--after-cutover", "target", "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert [x["phase"] for x in lines if x["event"] == "phase"][-1] == "Complete"
    assert not [x for x in lines if x["event"] == "serving"]
    assert target.client().dbsize() == 200
