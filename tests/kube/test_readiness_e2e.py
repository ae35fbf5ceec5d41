"""The operator on the real kube-apiserver, a cluster-mode-disabled source and a cluster-mode target
(static provider), the application a standalone-mode client following the endpoint Secret: Preflight
warns from the source's CLIENT LIST, the worker's readiness report names the client (status.clients,
a Warning Event, `kubectl describe`), and with spec.endpoint.afterCutover proxy the application keeps
writing, unchanged, through the proxy after Complete — every acknowledged write on the target."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s_client

from durablecache.testing.localvalkey import LocalCluster, LocalServer
from durablecache.testing.waiting import wait_for
from durablecache.testing.workload import seed

from .conftest import KubeEnv
from .test_operator import (  # noqa: F401 - operator_factory is a fixture
    GROUP,
    MIGRATION_TIMEOUT,
    VERSION,
    Cluster,
    Operator,
    assert_no_rbac_denials,
    operator_factory,
    phase_seen,
    start_app,
)


def manifest(name: str, source: LocalServer, target: LocalCluster) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "DurableCache", "metadata": {"name": name},
        "spec": {
            "source": {"endpoints": [{"host": "127.0.0.1", "port": source.port}]},
            "target": {"provider": "static", "durability": "sync",
                       "endpoints": [{"host": "127.0.0.1", "port": target.nodes[0].port}]},
            "routeIn": {"settlePeriod": "1s"},
            "cutover": {"mode": "auto", "maxWritePause": "1s", "drainBudget": "800ms", "rollbackWindow": "2s"},
            "endpoint": {"secretName": "app-cache", "afterCutover": "proxy"},
        },
    }


def warnings(cluster: Cluster, name: str, reason: str) -> list[str]:
    return [m for t, r, m in cluster.events(name) if t == "Warning" and r == reason]


def test_standalone_client_named_by_the_readiness_report_keeps_working_through_the_proxy_after_complete(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str,
        make_server: Callable[..., LocalServer], make_cluster: Callable[..., LocalCluster],
        operator_factory: Callable[..., Operator]) -> None:  # noqa: F811
    source, target = make_server(), make_cluster(primaries=3)
    with contextlib.closing(source.client()) as c:
        seed(c, 1000)
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    app = start_app(cluster, source)        # valkey-py, standalone mode: what most applications are
    op = operator_factory()
    try:
        op.start()
        cluster.apply(manifest("carts", source, target))
        # Preflight, from the source's own CLIENT LIST (the application is still on the source).
        early = wait_for("the Preflight readiness warning", lambda: warnings(cluster, "carts", "ClientReadiness"), 60)
        assert early[0].startswith("the source's CLIENT LIST: ") and "valkey-py" in early[0], early
        # The worker's report, from what the proxy saw of the application.
        status_clients = wait_for(
            "status.clients to name the standalone client",
            lambda: (c := cluster.status("carts").get("clients")) and c.get("standaloneConnections") and c, 90)
        groups = [g for g in status_clients["groups"] if g["lib"] == "valkey-py"]
        assert groups and all(g["mode"] == "standalone" and g["version"] for g in groups), status_clients
        assert status_clients["ready"] is False
        from_proxy = wait_for("the worker's readiness Event", lambda: [
            m for m in warnings(cluster, "carts", "ClientReadiness") if not m.startswith("the source's")], 60)
        assert "standalone-mode clients (valkey-py" in from_proxy[0]
        assert "after cutover they will reach a cluster-mode endpoint" in from_proxy[0]
        assert "spec.endpoint.afterCutover: proxy" in from_proxy[0]
        described = kube_env.kubectl("describe", "dcache", "carts", "-n", kube_namespace).stdout
        assert "ClientReadiness" in described and "Standalone Connections" in described, described[-3000:]

        wait_for("Complete", phase_seen(cluster, "carts", {"Complete"}), MIGRATION_TIMEOUT)
        proxy = cluster.status("carts")["endpoints"]["proxy"]
        acked_at_complete = app.load.acked
        # The application goes on writing through the proxy after Complete...
        wait_for("50 more acknowledged writes after Complete", lambda: app.load.acked >= acked_at_complete + 50, 30)
        # ...which is still its endpoint, and still running.
        secret = cluster.secret("app-cache")
        assert f"{secret['host']}:{secret['port']}" == proxy
        assert cluster.status("carts")["endpoints"]["active"] == "proxy"
        assert op.worker_pids(), "the worker (the proxy) must keep running after Complete"
        assert "WorkerRemoved" not in [r for _, r, _ in cluster.events("carts")]
    finally:
        app.stop()
    assert app.addresses == [f"127.0.0.1:{source.port}", proxy], app.addresses
    with contextlib.closing(target.cluster_client()) as c:
        lost = app.load.lost(c)
    assert sum(node.client().dbsize() for node in target.primaries) >= 1000
    assert lost == [], lost[:10]
    # Deleting the DurableCache then puts the applications on the target and stops the worker.
    kube_env.kubectl("delete", "dcache", "carts", "-n", kube_namespace, "--wait=false")
    wait_for("the worker to stop after deletion", lambda: not op.worker_pids(), 60)
    op.kill(signal.SIGTERM)
    assert_no_rbac_denials(op)
