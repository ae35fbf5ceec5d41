"""Many proxy pods joined to one coordinator, end to end on the real kube-apiserver (docs/ha.md#in-kubernetes).

The operator runs with ``--runner=local`` (there is no kubelet): its LocalProcessRunner starts the
coordinator (``durablecache worker --proxies 0 --coordinator-listen``) and one process group per proxy
pod (``durablecache proxy --join``), on one shared client port, and starts a pod again when it dies, as
the proxy Deployment would. Real Valkey servers, a write load with a ledger of acknowledged writes.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from kubernetes import client as k8s_client

from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.waiting import wait_for
from durablecache.testing.workload import seed

from . import test_operator
from .conftest import KubeEnv
from .test_operator import (
    MIGRATION_TIMEOUT,
    Cluster,
    Operator,
    assert_target_has_every_acked_write,
    durablecache,
    phase_seen,
    start_app,
)

operator_factory = test_operator.operator_factory     # the fixture: operators watching this test's namespace
TWO_OF_TWO = {"ready": 2, "total": 2, "processes": 2, "display": "2/2"}


def proxy_pid(op: Operator, namespace: str, name: str, pod: int) -> int | None:
    """The leader of proxy pod ``pod``'s process group, as the runner recorded it, if it runs."""
    path = op.state / "proxies" / f"{namespace}.{name}.{pod}.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text())
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] != "Z":
            return pid
    return None


def reasons(cluster: Cluster, name: str) -> list[str]:
    return [reason for _, reason, _ in cluster.events(name)]


def start_two_proxy_migration(cluster: Cluster, source: LocalServer, target: LocalServer,
                              op: Operator, name: str) -> None:
    """A manual-cutover migration with two proxy pods of one process each, up to Sync with both joined."""
    body = durablecache(name, source, target, mode="manual")
    body["spec"]["proxy"] = {"replicas": 2, "processes": 1}
    cluster.apply(body)
    wait_for("Sync awaiting approval",
             lambda: cluster.condition(name, "Progressing").get("reason") == "AwaitingApproval", 90)
    wait_for("both proxy pods joined", lambda: cluster.status(name).get("proxies") == TWO_OF_TWO, 30)
    assert all(proxy_pid(op, cluster.ns, name, i) for i in (0, 1))


def finish(cluster: Cluster, name: str, target: LocalServer) -> None:
    cluster.patch_spec(name, {"cutover": {"approved": True}})
    wait_for("Complete", phase_seen(cluster, name, {"Complete"}), MIGRATION_TIMEOUT)
    wait_for("the endpoint Secret to point at the target",
             lambda: cluster.secret("app-cache")["port"] == str(target.port), 20)


def test_two_proxy_pods_carry_a_migration_under_load(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator]) -> None:
    source, target = make_server(), make_server()
    with contextlib.closing(source.client()) as c:
        seed(c, 3000)
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    app = start_app(cluster, source)
    op = operator_factory()
    try:
        op.start()
        start_two_proxy_migration(cluster, source, target, op, "sessions")
        # The applications write through the proxies (the endpoint Secret names their shared address).
        proxy = cluster.status("sessions")["endpoints"]["proxy"]
        wait_for("the load on the proxies", lambda: app.addresses[-1:] == [proxy], 20)
        row = kube_env.kubectl("get", "dcache", "sessions", "-n", kube_namespace).stdout.splitlines()
        assert row[0].split()[6] == "PROXIES" and row[1].split()[6] == "2/2", row
        finish(cluster, "sessions", target)
    finally:
        app.stop()
    assert_target_has_every_acked_write(app, target, min_keys=3000)
    events = reasons(cluster, "sessions")
    assert events.count("ProxyJoined") == 2 and "CoordinatorListening" in events, events
    # Nothing went wrong: no Warning but the static target's PreflightWarning.
    warnings = [reason for type_, reason, _ in cluster.events("sessions") if type_ == "Warning"]
    assert warnings == ["PreflightWarning"], warnings
    # The operator removes the coordinator and the proxies once the migration is complete.
    wait_for("the proxy pods to be gone",
             lambda: not any(proxy_pid(op, kube_namespace, "sessions", i) for i in (0, 1)), 30)


def test_a_proxy_pod_killed_in_sync_is_started_again_and_nothing_is_lost(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator]) -> None:
    source, target = make_server(), make_server()
    with contextlib.closing(source.client()) as c:
        seed(c, 3000)
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    app = start_app(cluster, source)
    op = operator_factory()
    try:
        op.start()
        start_two_proxy_migration(cluster, source, target, op, "orders")
        proxy = cluster.status("orders")["endpoints"]["proxy"]
        wait_for("the load on the proxies", lambda: app.addresses[-1:] == [proxy], 20)
        repaired = reasons(cluster, "orders").count("Repaired")
        killed = proxy_pid(op, kube_namespace, "orders", 0)
        assert killed is not None
        os.killpg(killed, signal.SIGKILL)          # the whole pod, no goodbye
        wait_for("the proxy pod started again",
                 lambda: (pid := proxy_pid(op, kube_namespace, "orders", 0)) and pid != killed, 30)
        # Its streamed marks may be lost: the coordinator repairs before any cutover.
        wait_for("the repair the loss demands",
                 lambda: "RepairRequired" in (r := reasons(cluster, "orders")) and r.count("Repaired") > repaired, 90)
        wait_for("both proxy pods joined again", lambda: cluster.status("orders").get("proxies") == TWO_OF_TWO, 30)
        assert cluster.phase("orders") == "Sync"
        finish(cluster, "orders", target)
    finally:
        app.stop()
    assert_target_has_every_acked_write(app, target, min_keys=3000)
    events = reasons(cluster, "orders")
    assert "ProxyLeft" in events and events.count("ProxyJoined") >= 3, events
    # The coordinator was not restarted: a proxy pod's loss is routine.
    assert "WorkerRestarted" not in events, events
