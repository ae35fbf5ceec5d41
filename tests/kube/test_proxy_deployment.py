"""Many proxy pods joined to one coordinator, end to end on the real kube-apiserver (docs/ha.md#in-kubernetes).

The operator runs with ``--runner=local`` (there is no kubelet): its LocalProcessRunner starts the
coordinator (``durablecache worker --proxies 0 --coordinator-listen``) and one process group per proxy
pod (``durablecache proxy --join``), on one shared client port, and starts a pod again when it dies, as
the proxy Deployment would. Real Valkey servers, a write load with a ledger of acknowledged writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
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


def pods(ready: int, processes: int = 1) -> dict[str, object]:
    """status.proxies with ``ready`` of ``ready`` pods joined, ``processes`` each."""
    return {"ready": ready, "total": ready, "processes": ready * processes, "display": f"{ready}/{ready}"}


@dataclasses.dataclass
class Run:
    """One migration through two proxy pods under an application's write load."""

    cluster: Cluster
    op: Operator
    target: LocalServer
    name: str

    def pid(self, pod: int) -> int | None:
        return proxy_pid(self.op, self.cluster.ns, self.name, pod)

    def reasons(self) -> list[str]:
        return reasons(self.cluster, self.name)

    def proxies(self) -> object:
        return self.cluster.status(self.name).get("proxies")

    def finish(self) -> None:
        """Approve the cutover; Complete, and the applications' endpoint on the target."""
        self.cluster.patch_spec(self.name, {"cutover": {"approved": True}})
        self.complete()

    def complete(self) -> None:
        wait_for("Complete", phase_seen(self.cluster, self.name, {"Complete"}), MIGRATION_TIMEOUT)
        wait_for("the endpoint Secret to point at the target",
                 lambda: self.cluster.secret("app-cache")["port"] == str(self.target.port), 20)


@pytest.fixture
def two_pods(kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str,
             make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator]
             ) -> Callable[..., contextlib.AbstractContextManager[Run]]:
    @contextlib.contextmanager
    def start(name: str, processes: int = 1) -> Iterator[Run]:
        """A manual-cutover migration with two proxy pods of ``processes`` processes each, up to Sync
        with both joined and the applications writing through them; on a clean exit, every write
        they had acknowledged is on the target."""
        source, target = make_server(), make_server()
        with contextlib.closing(source.client()) as c:
            seed(c, 3000)
        cluster = Cluster(kube_api, kube_env, kube_namespace)
        app = start_app(cluster, source)
        op = operator_factory()
        run = Run(cluster, op, target, name)
        try:
            op.start()
            body = durablecache(name, source, target, mode="manual")
            body["spec"]["proxy"] = {"replicas": 2, "processes": processes}
            cluster.apply(body)
            wait_for("Sync awaiting approval",
                     lambda: cluster.condition(name, "Progressing").get("reason") == "AwaitingApproval", 90)
            wait_for("both proxy pods joined", lambda: run.proxies() == pods(2, processes), 30)
            assert all(run.pid(i) for i in (0, 1))
            # The applications write through the proxies (the endpoint Secret names their shared address).
            proxy = cluster.status(name)["endpoints"]["proxy"]
            wait_for("the load on the proxies", lambda: app.addresses[-1:] == [proxy], 20)
            yield run
        finally:
            app.stop()
        assert_target_has_every_acked_write(app, target, min_keys=3000)

    return start


def test_two_proxy_pods_carry_a_migration_under_load(two_pods, kube_env: KubeEnv, kube_namespace: str) -> None:
    with two_pods("sessions") as run:
        row = kube_env.kubectl("get", "dcache", "sessions", "-n", kube_namespace).stdout.splitlines()
        assert row[0].split()[6] == "PROXIES" and row[1].split()[6] == "2/2", row
        run.finish()
    events = run.reasons()
    assert events.count("ProxyJoined") == 2 and "CoordinatorListening" in events, events
    # Nothing went wrong: no Warning but the static target's PreflightWarning.
    warnings = [reason for type_, reason, _ in run.cluster.events("sessions") if type_ == "Warning"]
    assert warnings == ["PreflightWarning"], warnings
    # The fleet's channels were TLS: the coordinator's join and mark server, each proxy pod's admin API
    # (they joined, so both ends had the same certificate: docs/ha.md, Transport).
    logs = [run.op.state / f"{kube_namespace}.sessions.log",
            *(run.op.state / "proxies" / f"{kube_namespace}.sessions.{i}.log" for i in (0, 1))]
    for path, event in zip(logs, ["marks.listening", "proxy.admin_listening", "proxy.admin_listening"]):
        lines = [json.loads(line) for line in path.read_text().splitlines() if f'"{event}"' in line]
        assert lines and all(line["tls"] is True for line in lines), (path, lines)
    # The operator removes the coordinator and the proxies once the migration is complete.
    wait_for("the proxy pods to be gone", lambda: not any(run.pid(i) for i in (0, 1)), 30)


def test_a_proxy_pod_killed_in_sync_is_started_again_and_nothing_is_lost(two_pods) -> None:
    with two_pods("orders") as run:
        repaired = run.reasons().count("Repaired")
        killed = run.pid(0)
        assert killed is not None
        os.killpg(killed, signal.SIGKILL)          # the whole pod, no goodbye
        wait_for("the proxy pod started again", lambda: (pid := run.pid(0)) and pid != killed, 30)
        # Its streamed marks may be lost: the coordinator repairs before any cutover.
        wait_for("the repair the loss demands",
                 lambda: "RepairRequired" in (r := run.reasons()) and r.count("Repaired") > repaired, 90)
        wait_for("both proxy pods joined again", lambda: run.proxies() == pods(2), 30)
        assert run.cluster.phase("orders") == "Sync"
        run.finish()
    events = run.reasons()
    assert "ProxyLeft" in events and events.count("ProxyJoined") >= 3, events
    # The coordinator was not restarted: a proxy pod's loss is routine.
    assert "WorkerRestarted" not in events, events


def test_a_proxy_pod_added_in_sync_joins_and_nothing_is_lost(two_pods) -> None:
    """Two pods of two processes each; a third pod added (spec.proxy.replicas 2 -> 3) while the
    applications write: its processes join, the migration completes, nothing acknowledged is lost."""
    with two_pods("carts", processes=2) as run:
        run.cluster.patch_spec("carts", {"proxy": {"replicas": 3}})
        wait_for("the third pod joined", lambda: run.proxies() == pods(3, 2), 60)
        assert run.pid(2)
        assert run.cluster.phase("carts") == "Sync"
        run.finish()
    assert run.reasons().count("ProxyJoined") == 6


def test_a_proxy_pod_killed_as_the_cutover_starts_loses_nothing(two_pods) -> None:
    """Two pods of two processes each; one pod SIGKILLed the moment the cutover is approved (its
    attempt runs or begins then): the attempt aborts or completes, the runner starts the pod again,
    the migration completes, nothing acknowledged is lost."""
    with two_pods("wishlist", processes=2) as run:
        killed = run.pid(1)
        assert killed is not None
        run.cluster.patch_spec("wishlist", {"cutover": {"approved": True}})
        os.killpg(killed, signal.SIGKILL)
        run.complete()
    assert "ProxyLeft" in run.reasons()
