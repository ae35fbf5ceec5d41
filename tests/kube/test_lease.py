"""The coordinator Lease (k8s/lease.py) on the real kube-apiserver: one coordinator per DurableCache, a
fencing epoch that grows with every holder, a standby that takes over from a killed coordinator (and
the migration resumes from the status with no acknowledged write lost), and a coordinator cut off from
the API server that stops acting before anyone can take over.

Workers are local processes standing in for pods (there is no kubelet here), running as a
ServiceAccount that holds exactly the chart's worker ClusterRole in the test's namespace."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from durablecache.k8s.lease import CoordinatorLease, LeaseLost, LeaseTimings, lease_name
from durablecache.ports import free_port
from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.waiting import wait_for
from durablecache.testing.workload import seed
from faults.faultproxy import FaultProxy  # tests/ is on sys.path (rootdir insertion)

from .conftest import KubeEnv
from .test_operator import (  # noqa: F401 - operator_factory is a fixture
    MIGRATION_TIMEOUT,
    TEST_LEASE,
    Cluster,
    Operator,
    assert_no_rbac_denials,
    durablecache,
    migrating,
    operator_factory,
    phase_seen,
    writes_on_target,
)

DURATION = int(TEST_LEASE["DURABLECACHE_LEASE_DURATION"])
RENEW_DEADLINE = float(TEST_LEASE["DURABLECACHE_LEASE_RENEW_DEADLINE"])
RETRY = float(TEST_LEASE["DURABLECACHE_LEASE_RETRY_PERIOD"])
# A contender takes over at most a lease duration after the last renewal it saw, plus one look.
TAKEOVER_BOUND = DURATION + 2 * RETRY + 1.5   # + process scheduling on a loaded 2-core machine


# -- the lease alone ------------------------------------------------------------------------------

def _owner(api: k8s_client.ApiClient, env: KubeEnv, namespace: str, name: str) -> dict[str, Any]:
    """A DurableCache to own the Lease (never reconciled: no operator runs in these tests)."""
    env.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": "durablecache.dev/v1alpha1", "kind": "DurableCache", "metadata": {"name": name},
        "spec": {"source": {"endpoints": [{"host": "127.0.0.1", "port": 1}]},
                 "target": {"provider": "static", "durability": "sync",
                            "endpoints": [{"host": "127.0.0.1", "port": 2}]},
                 "endpoint": {"secretName": "x"}}}))
    return k8s_client.CustomObjectsApi(api).get_namespaced_custom_object(  # type: ignore[no-any-return]
        "durablecache.dev", "v1alpha1", namespace, "durablecaches", name)


FAST = LeaseTimings(duration=3, renew_deadline=2.0, retry_period=0.25)


def test_two_contenders_one_holder_and_the_epoch_grows_with_every_holder(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, crd_installed: str, kube_namespace: str,
        worker_kubeconfig: Path) -> None:
    obj = _owner(kube_api, kube_env, kube_namespace, "leased")
    api = k8s_config.new_client_from_config(config_file=str(worker_kubeconfig))   # the worker's rights
    first, second = (CoordinatorLease(api, obj, f"worker-{n}", FAST) for n in (1, 2))
    # A Lease deleted by hand must not restart the epochs below what the status says (floor).
    assert first.acquire(floor=6, timeout=10) == 7
    first.start_renewing(lambda reason: None)
    won: list[int] = []
    racer = threading.Thread(target=lambda: won.append(second.acquire(timeout=20)), daemon=True)
    racer.start()
    coordination = k8s_client.CoordinationV1Api(kube_api)
    lease = coordination.read_namespaced_lease(lease_name(obj), kube_namespace)
    assert (lease.spec.holder_identity, lease.spec.lease_transitions) == ("worker-1", 7)
    ref = lease.metadata.owner_references[0]
    assert (ref.kind, ref.name, ref.uid) == ("DurableCache", "leased", obj["metadata"]["uid"])
    # The holder renews for more than a lease duration while the other waits: it stays the holder.
    renewed = lease.spec.renew_time
    wait_for("renewals for longer than a lease duration", lambda: (
        coordination.read_namespaced_lease(lease_name(obj), kube_namespace).spec.renew_time - renewed
    ).total_seconds() > FAST.duration + 1, 15, interval=0.2)
    assert won == [] and first.valid() and not second.valid()
    first.release()
    racer.join(timeout=10)
    assert won == [8], won        # released: taken at once, with the next epoch
    lease = coordination.read_namespaced_lease(lease_name(obj), kube_namespace)
    assert (lease.spec.holder_identity, lease.spec.lease_transitions) == ("worker-2", 8)
    assert not first.valid()
    # A holder that stops renewing is no longer valid after the renew deadline, before the duration.
    started = time.monotonic()
    wait_for("the unrenewed holder to stop being valid", lambda: not second.valid(), FAST.renew_deadline + 2,
             interval=0.05)
    assert time.monotonic() - started <= FAST.renew_deadline + 0.5
    third = CoordinatorLease(api, obj, "worker-3", FAST)
    assert third.acquire(timeout=FAST.duration + 5) == 9
    third.release()
    api.close()


def test_simultaneous_contenders_for_a_free_lease_make_exactly_one_holder(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, crd_installed: str, kube_namespace: str,
        worker_kubeconfig: Path) -> None:
    """The resourceVersion precondition: contenders that all read the same free record, write at once."""
    obj = _owner(kube_api, kube_env, kube_namespace, "raced")
    apis = [k8s_config.new_client_from_config(config_file=str(worker_kubeconfig)) for _ in range(4)]
    leases = [CoordinatorLease(a, obj, f"racer-{n}", FAST) for n, a in enumerate(apis)]
    gate = threading.Barrier(len(leases))
    outcome: dict[str, int | str] = {}

    def contend(lease: CoordinatorLease) -> None:
        gate.wait(timeout=10)
        try:
            outcome[lease.holder] = lease.acquire(timeout=1.0)   # < a lease duration: only a free lease
        except LeaseLost:
            outcome[lease.holder] = "waiting"

    threads = [threading.Thread(target=contend, args=(lease,), daemon=True) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    winners = {h: e for h, e in outcome.items() if e != "waiting"}
    assert len(outcome) == 4 and list(winners.values()) == [1], outcome
    holder = k8s_client.CoordinationV1Api(kube_api).read_namespaced_lease(lease_name(obj), kube_namespace)
    assert holder.spec.holder_identity == next(iter(winners))
    for a in apis:
        a.close()


# -- workers ----------------------------------------------------------------------------------------

class Worker:
    """``durablecache worker`` started by the test (a second pod of the same worker, in effect)."""

    def __init__(self, workdir: Path, label: str, namespace: str, name: str, kubeconfig: Path, port: int,
                 coordinator: list[str] | None = None):
        self.log_path = workdir / f"worker-{label}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update(KUBECONFIG=str(kubeconfig), HOSTNAME=f"pod-{label}", **TEST_LEASE)
        args = [sys.executable, "-m", "durablecache.cli", "--log-json", "--log-level=info", "worker",
                "--resource", f"{namespace}/{name}", "--listen", f"127.0.0.1:{port}"]
        # ``coordinator``: instead of a proxy of its own, the flags that make it a coordinator proxies join.
        args += coordinator or []
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def lines(self, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == event:
                    out.append(doc)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def make(*args: Any) -> Worker:
        w = Worker(tmp_path, *args)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def coordinator(cluster: Cluster, name: str) -> dict[str, Any]:
    return cluster.status(name).get("coordinator") or {}


def test_a_standby_waits_then_takes_over_a_killed_coordinator_and_the_migration_completes(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str, worker_kubeconfig: Path,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator],  # noqa: F811
        workers: Callable[..., Worker]) -> None:
    source, target = make_server(), make_server()
    with contextlib.closing(source.client()) as c:
        seed(c, 2000)
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    op = operator_factory()
    with migrating(cluster, source, op, durablecache("orders", source, target, mode="manual")) as app:
        wait_for("Sync awaiting approval",
                 lambda: cluster.condition("orders", "Progressing").get("reason") == "AwaitingApproval", 60)
        first = coordinator(cluster, "orders")
        assert first["epoch"] >= 1 and first["holder"], first
        (first_pid,) = op.worker_pids()
        # A second coordinator of the same resource, as the runner starts one: no proxy of its own, the
        # same join port and token (a second pod behind the coordinator Service).
        fleet_port = (op.state / f"{kube_namespace}.orders.fleet-port").read_text()
        token = op.state / "proxies" / f"{kube_namespace}.orders.token"
        standby = workers("standby", kube_namespace, "orders", worker_kubeconfig, 0, [
            "--proxies", "0", "--coordinator-listen", f"127.0.0.1:{fleet_port}", "--join-token-file", str(token)])
        wait_for("the standby to wait for the lease",
                 lambda: standby.lines("coordinator lease held by another worker: waiting"), 30)
        coordination = k8s_client.CoordinationV1Api(kube_api)
        renewed = coordination.read_namespaced_lease("orders-coordinator", kube_namespace).spec.renew_time
        wait_for("the coordinator to renew for longer than a lease duration", lambda: (
            coordination.read_namespaced_lease("orders-coordinator", kube_namespace).spec.renew_time - renewed
        ).total_seconds() > DURATION + 1, 20, interval=0.25)
        assert standby.lines("coordinator lease acquired") == [] and standby.proc.poll() is None
        assert coordinator(cluster, "orders") == first

        # The coordinator's pod dies without a word.
        os.killpg(first_pid, signal.SIGKILL)
        killed_at = time.time()
        (acquired,) = wait_for("the standby to take the lease",
                               lambda: standby.lines("coordinator lease acquired"), TAKEOVER_BOUND + 10)
        assert acquired["epoch"] == first["epoch"] + 1, (acquired, first)
        takeover = acquired["at"] - killed_at
        assert takeover < TAKEOVER_BOUND, takeover
        wait_for("status.coordinator to name the standby",
                 lambda: coordinator(cluster, "orders").get("epoch") == first["epoch"] + 1, 20)
        assert coordinator(cluster, "orders")["holder"] == acquired["holder"] != first["holder"]
        # It resumes from the status: Sync, with the verify-and-repair a restart requires.
        wait_for("the repair after the takeover", lambda: standby.lines("engine event") and any(
            d.get("engine_event") == "repaired" for d in standby.lines("engine event")), 60)
        wait_for("awaiting approval again",
                 lambda: cluster.condition("orders", "Progressing").get("reason") == "AwaitingApproval", 60)
        cluster.patch_spec("orders", {"cutover": {"approved": True}})
        wait_for("Complete", phase_seen(cluster, "orders", {"Complete"}), MIGRATION_TIMEOUT)
        wait_for("the endpoint Secret to point at the target",
                 lambda: cluster.secret("app-cache")["port"] == str(target.port), 20)
        writes_on_target(app, target)   # the load writes to the target directly for a moment
    with contextlib.closing(target.client()) as c:
        lost = app.load.lost(c)
    assert lost == [], lost[:10]
    assert app.load.acked > 100
    reasons = [reason for _, reason, _ in cluster.events("orders")]
    assert reasons.count("CoordinatorElected") >= 2, reasons
    # The Complete was written by the standby, under its epoch (nobody else held the lease meanwhile).
    assert standby.lines("coordinator lease lost") == []
    assert_no_rbac_denials(op)
    standby_log = standby.log_path.read_text()
    assert "Forbidden" not in standby_log and "(403)" not in standby_log, standby_log[-3000:]
    print(f"takeover {takeover:.2f}s after SIGKILL (lease {DURATION}s); {app.load.acked} writes acknowledged")


def _through(kubeconfig: Path, port: int, out: Path) -> Path:
    """The same credentials, with the API server reached through a local TCP proxy on ``port``."""
    config = yaml.safe_load(kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o600)
    return out


def test_a_coordinator_cut_off_from_the_api_server_stops_before_the_standby_takes_over(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str, worker_kubeconfig: Path,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator],  # noqa: F811
        workers: Callable[..., Worker], tmp_path: Path) -> None:
    source, target = make_server(), make_server()
    with contextlib.closing(source.client()) as c:
        seed(c, 500)
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    # The operator only provisions (static: the endpoints from the spec); the workers are the test's.
    op = operator_factory()
    op.start()
    cluster.apply(durablecache("carts", source, target, mode="manual"))
    wait_for("Provision to finish", lambda: (cluster.status("carts").get("checkpoint") or {}).get(
        "operator", {}).get("provisioned"), 30)
    op.kill(signal.SIGTERM)
    op.kill_workers()
    api_port = int(kube_env.server.rsplit(":", 1)[1])
    fault = FaultProxy(api_port).start()
    try:
        cut_off = _through(worker_kubeconfig, fault.port, tmp_path / "through-proxy.kubeconfig")
        port = free_port()
        first = workers("first", kube_namespace, "carts", cut_off, port)
        (got,) = wait_for("the first worker to take the lease",
                          lambda: first.lines("coordinator lease acquired"), DURATION + 30)
        wait_for("the first worker to reach Sync", lambda: cluster.phase("carts") == "Sync", 60)
        standby = workers("standby", kube_namespace, "carts", worker_kubeconfig, port)
        wait_for("the standby to wait", lambda: standby.lines("coordinator lease held by another worker: waiting"),
                 30)
        fault.cut(300.0)            # every connection to the API server reset, new ones refused
        cut_at = time.time()
        code = first.proc.wait(timeout=DURATION + 30)
        (lost,) = first.lines("coordinator lease lost")
        (stopped,) = first.lines("coordinator stopped acting")
        (acquired,) = wait_for("the standby to take over", lambda: standby.lines("coordinator lease acquired"),
                               TAKEOVER_BOUND + 10)
    finally:
        fault.stop()
    assert code == LeaseLost.exit_code, code          # exits non-zero: restarted as a contender
    assert stopped["stopped"] is True
    # It noticed within the renew deadline of its last renewal (at most that long after the cut) and had
    # stopped acting before the standby could take the lease.
    assert lost["at"] - cut_at <= RENEW_DEADLINE + 1.0, (lost["at"] - cut_at)
    assert stopped["at"] < acquired["at"], (stopped, acquired)
    assert acquired["epoch"] == got["epoch"] + 1
    wait_for("status.coordinator to name the standby",
             lambda: coordinator(cluster, "carts").get("holder") == acquired["holder"], 20)
    assert coordinator(cluster, "carts")["epoch"] == acquired["epoch"]
    # The standby carries on from the status (its proxy took the same port the first one released).
    wait_for("the standby back in Sync awaiting approval",
             lambda: cluster.condition("carts", "Progressing").get("reason") == "AwaitingApproval"
             and any(d.get("engine_event") == "repaired" for d in standby.lines("engine event")), 60)
    print(f"lost {lost['at'] - cut_at:.2f}s after the cut, stopped {acquired['at'] - stopped['at']:.2f}s "
          f"before the standby took over (epoch {acquired['epoch']})")
