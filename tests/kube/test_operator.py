"""The operator end to end on the real kube-apiserver: real Valkey servers, a write load with a ledger of
acknowledged writes, the operator as a local process under the chart's service account (so it has
exactly the chart's RBAC), and moto in server mode for the aws provider.

There is no kubelet in the test cluster, so the operator runs with ``--runner=local``: the proxy/syncer
worker, which in a cluster is the pod of the Deployment the operator creates, runs as a local process
started by the operator (same command, same status checkpoint, and like a pod it outlives an operator
restart).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import valkey
import yaml
from kubernetes import client as k8s_client

from durablecache.ports import free_port
from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.waiting import wait_for
from durablecache.testing.workload import Workload, seed

from .conftest import AWS_TEST_ENV, KubeEnv, OperatorRelease, ServiceAccountKubeconfig

GROUP, VERSION, PLURAL = "durablecache.dev", "v1alpha1", "durablecaches"
OPERATOR_START_TIMEOUT = 30.0
MIGRATION_TIMEOUT = 90.0


class Operator:
    """``durablecache operator`` as a local process, authenticated as the chart's ServiceAccount."""

    def __init__(self, kube_env: KubeEnv, release: OperatorRelease, workdir: Path, namespace: str,
                 extra_env: dict[str, str], *, standalone: bool = False):
        self.env = {**kube_env.process_env(release.kubeconfig), "POD_ID": "durablecache-operator-test",
                    **extra_env}
        self.peering_arg = "--standalone" if standalone else f"--peering={release.peering}"
        self.namespace = namespace
        self.state = workdir / "workers"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.health_port = self.metrics_port = 0
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"operator-{self.starts}.log"

    def start(self, runner: str = "local", extra_args: tuple[str, ...] = ()) -> None:
        self.starts += 1
        self.health_port, self.metrics_port = free_port(), free_port()
        args = [sys.executable, "-m", "durablecache.cli", "--log-json", "--log-level=info", "operator",
                self.peering_arg, f"--namespace={self.namespace}", f"--runner={runner}",
                f"--local-state-dir={self.state}", "--health-host=127.0.0.1", f"--health-port={self.health_port}",
                "--metrics-host=127.0.0.1", f"--metrics-port={self.metrics_port}", "--interval=0.5", *extra_args]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        wait_for("the operator's /healthz", self._healthy, OPERATOR_START_TIMEOUT)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as rsp:
                return rsp.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as rsp:
            return rsp.read().decode()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Exactly the process we started (its own session), then reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def worker_pids(self) -> list[int]:
        return [int(p.read_text()) for p in self.state.glob("*.pid")] if self.state.exists() else []

    def kill_workers(self) -> None:
        """The workers the operator started (pids it recorded), each its own process group."""
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("operator-*.log")))

    def worker_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.state.glob("*.log")))


# Short coordinator-lease timings for the workers the tests start (production: 15 s / 10 s / 2 s); the
# renew deadline leaves a loaded 2-core machine's API server 4 s to answer one of 8 renewals.
TEST_LEASE = {"DURABLECACHE_LEASE_DURATION": "6", "DURABLECACHE_LEASE_RENEW_DEADLINE": "4",
              "DURABLECACHE_LEASE_RETRY_PERIOD": "0.5"}


@pytest.fixture
def operator_factory(kube_env: KubeEnv, operator_release: OperatorRelease, kube_namespace: str,
                     tmp_path: Path, worker_kubeconfig: Path) -> Iterator[Callable[..., Operator]]:
    """Operators watching only this test's namespace: other tests leave DurableCaches behind (namespaces
    never finish deleting here), and an operator must not act on those. Their local workers run as the
    worker identity (``worker_kubeconfig``) with short lease timings."""
    made: list[Operator] = []

    def make(namespace: str | None = None, standalone: bool = False, **extra_env: str) -> Operator:
        extra_env = {"DURABLECACHE_LOCAL_WORKER_KUBECONFIG": str(worker_kubeconfig), **TEST_LEASE, **extra_env}
        op = Operator(kube_env, operator_release, tmp_path / f"op{len(made)}", namespace or kube_namespace, extra_env,
                      standalone=standalone)
        op.workdir.mkdir(parents=True)
        made.append(op)
        return op

    yield make
    for op in made:
        op.kill(signal.SIGTERM)
        op.kill_workers()


class Cluster:
    """Admin-side reads and writes, as the user (kubectl) and the test see the cluster."""

    def __init__(self, api: k8s_client.ApiClient, kube_env: KubeEnv, namespace: str):
        self.custom = k8s_client.CustomObjectsApi(api)
        self.core = k8s_client.CoreV1Api(api)
        self.env = kube_env
        self.ns = namespace

    def apply(self, manifest: dict[str, Any]) -> None:
        self.env.kubectl("apply", "-n", self.ns, "-f", "-", stdin=yaml.safe_dump(manifest))

    def get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)  # type: ignore

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def phase(self, name: str) -> str | None:
        return self.status(name).get("phase")

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def secret(self, name: str) -> dict[str, str]:
        data = self.core.read_namespaced_secret(name, self.ns).data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def make_secret(self, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(self.ns, {"metadata": {"name": name}, "stringData": data})

    def events(self, name: str) -> list[tuple[str, str, str]]:
        items = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        ordered = sorted(items, key=lambda e: (e.first_timestamp or e.metadata.creation_timestamp, e.metadata.name))
        return [(e.type, e.reason, e.message) for e in ordered]

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == type_), {})


def durablecache(name: str, source: LocalServer, target: LocalServer, *, mode: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "DurableCache", "metadata": {"name": name},
        "spec": {
            "source": {"endpoints": [{"host": "127.0.0.1", "port": source.port}]},
            "target": {"provider": "static", "durability": "sync",
                       "endpoints": [{"host": "127.0.0.1", "port": target.port}]},
            "routeIn": {"settlePeriod": "1s"},
            # A loaded 2-core CI machine: a generous pause bound keeps the cutover from aborting forever.
            # (drainBudget: the worker passes it on; the CRD checks it against maxWritePause.)
            "cutover": {"mode": mode, "maxWritePause": "1s", "drainBudget": "800ms", "rollbackWindow": "2s"},
            "endpoint": {"secretName": "app-cache"},
        },
    }


class App:
    """The application: a write load that follows the endpoint Secret, as a restarted pod would."""

    def __init__(self, cluster: Cluster, source: LocalServer):
        self.cluster = cluster
        self.load = Workload("127.0.0.1", source.port, writers=2, rate=150, prefix="app")
        self.addresses: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread_error: BaseException | None = None
        self._stop = asyncio.Event()
        self._runner: Any = None

    def start(self) -> None:
        import threading

        def main() -> None:
            try:
                self.loop.run_until_complete(self._main())
            except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
                self.thread_error = exc

        self._runner = threading.Thread(target=main, daemon=True)
        self._runner.start()

    async def _main(self) -> None:
        self.load.start()
        while not self._stop.is_set():
            data = await asyncio.to_thread(self.cluster.secret, "app-cache")
            address = f"{data['host']}:{data['port']}"
            if not self.addresses or self.addresses[-1] != address:
                self.addresses.append(address)
                self.load.point_at(data["host"], int(data["port"]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.2)
        await self.load.finish()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._runner.join(timeout=30)
        assert not self._runner.is_alive(), "the write load did not stop"
        if self.thread_error:
            raise self.thread_error


def phase_seen(cluster: Cluster, name: str, phases: set[str]) -> Callable[[], str | None]:
    def probe() -> str | None:
        phase = cluster.phase(name)
        if phase == "Failed":
            raise AssertionError(f"migration failed: {cluster.status(name).get('conditions')}")
        return phase if phase in phases else None

    return probe


def assert_no_rbac_denials(op: Operator) -> None:
    """The operator and its workers used only what the chart's ClusterRole grants."""
    text = op.logs() + op.worker_logs()
    assert "Forbidden" not in text and '"status": 403' not in text and "(403)" not in text, text[-3000:]


def assert_target_has_every_acked_write(app: App, target: LocalServer, min_keys: int) -> None:
    """Every write the application had acknowledged is on the target, which holds the keyspace."""
    with contextlib.closing(target.client()) as c:
        lost = app.load.lost(c)
        assert c.dbsize() >= min_keys
    assert lost == [], lost[:10]
    assert app.load.acked > 100


def writes_on_target(app: App, target: LocalServer, more: int = 50) -> None:
    """Until the application follows the Secret to the target and has ``more`` writes acknowledged there."""
    acked = app.load.acked
    wait_for(f"{more} writes acknowledged on the target",
             lambda: app.addresses[-1:] == [f"127.0.0.1:{target.port}"] and app.load.acked >= acked + more, 20)


def start_app(cluster: Cluster, source: LocalServer) -> App:
    cluster.make_secret("app-cache", {"host": "127.0.0.1", "port": str(source.port), "tls": "false",
                                      "url": f"valkey://127.0.0.1:{source.port}"})
    app = App(cluster, source)
    app.start()
    return app


@contextlib.contextmanager
def migrating(cluster: Cluster, source: LocalServer, op: Operator, resource: dict[str, Any]) -> Iterator[App]:
    """The start every end-to-end migration here shares: an application writing to the source through
    the endpoint Secret, the operator started, the DurableCache applied. The application is stopped
    when the block ends, whatever happened in it."""
    app = start_app(cluster, source)
    try:
        op.start()
        cluster.apply(resource)
        yield app
    finally:
        app.stop()


def test_static_migration_under_load_survives_an_operator_kill(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator]) -> None:
    source, target = make_server(), make_server()
    with contextlib.closing(source.client()) as c:
        seed(c, 3000)
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    op = operator_factory()
    with migrating(cluster, source, op, durablecache("sessions", source, target, mode="auto")) as app:
        wait_for("RouteIn", phase_seen(cluster, "sessions", {"RouteIn", "Copy", "Sync", "Cutover", "RouteOut",
                                                             "Complete"}), 30)
        wait_for("the endpoint Secret to point at the proxy",
                 lambda: cluster.status("sessions").get("endpoints", {}).get("active") in ("proxy", "target"), 30)
        proxy = cluster.status("sessions")["endpoints"]["proxy"]
        # The operator dies in the middle of the migration (no graceful shutdown) and comes back.
        op.kill(signal.SIGKILL)
        killed_in = cluster.phase("sessions")
        op.start()
        wait_for("Complete", phase_seen(cluster, "sessions", {"Complete"}), MIGRATION_TIMEOUT)
        secret = wait_for("the endpoint Secret to point at the target",
                          lambda: (s := cluster.secret("app-cache"))["port"] == str(target.port) and s, 20)
        writes_on_target(app, target)   # the load writes to the target directly for a moment
    assert secret == {"host": "127.0.0.1", "port": str(target.port), "tls": "false",
                      "url": f"valkey://127.0.0.1:{target.port}"}
    # The applications went source -> proxy -> target, as the Secret said.
    assert app.addresses == [f"127.0.0.1:{source.port}", proxy, f"127.0.0.1:{target.port}"], app.addresses
    assert_target_has_every_acked_write(app, target, min_keys=3000)

    status = cluster.status("sessions")
    assert status["progress"]["display"] == "100%"
    assert status["targetDurability"] == "unknown"  # static: nothing to read back
    assert status["endpoints"]["active"] == "target"
    ready, progressing, degraded = (cluster.condition("sessions", t) for t in ("Ready", "Progressing", "Degraded"))
    assert (ready["status"], ready["reason"]) == ("True", "MigrationComplete")
    assert (progressing["status"], degraded["status"]) == ("False", "False")
    assert ready["observedGeneration"] == cluster.get("sessions")["metadata"]["generation"]
    # The operator removes the worker (and says so) right after it sees Complete: wait for that Event,
    # as the status checks above could otherwise run a few milliseconds ahead of it.
    wait_for("the WorkerRemoved event", lambda: "WorkerRemoved" in [r for _, r, _ in cluster.events("sessions")], 30)
    reasons = [reason for _, reason, _ in cluster.events("sessions")]
    for phase in ("Preflight", "Provision", "RouteIn", "Copy", "Sync", "Cutover", "RouteOut", "Complete"):
        assert phase in reasons, (phase, reasons)
    # Both switches happened (app.addresses above); their Events are best effort: a SIGKILL between the
    # Secret's write and its Event loses that Event (the restarted operator finds the Secret already
    # switched), so the one to the target, after the restart, is the one that must be there.
    assert reasons.count("EndpointSwitched") in (1, 2), reasons
    assert any(r == "EndpointSwitched" and "use the target" in m for _, r, m in cluster.events("sessions"))
    assert "WorkerRemoved" in reasons
    # A healthy migration (the operator's own crash is not the migration's) posts no Warning: the planned
    # verify pass after the copy is a Normal "Verifying", applications still moving onto the proxy a
    # Normal "RouteInWaiting". (PreflightWarning says a static target's durability cannot be checked:
    # a fact of the configuration, said once.)
    warnings = [reason for type_, reason, _ in cluster.events("sessions") if type_ == "Warning"]
    assert warnings == ["PreflightWarning"], warnings
    assert "Verifying" in reasons
    # The worker (standing in for the pod) is gone once the migration is complete.
    wait_for("the worker process to exit", lambda: not op.worker_pids(), 15)

    table = kube_env.kubectl("get", "dcache", "-n", kube_namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "PHASE", "PROGRESS", "DURABILITY", "SOURCE", "TARGET"], header
    # SOURCE and TARGET are filled for the static provider too (status.sourceName/targetName).
    assert row.split()[:6] == ["sessions", "Complete", "100%", "unknown", f"127.0.0.1:{source.port}",
                               f"127.0.0.1:{target.port}"], row
    metrics = op.metrics()
    assert f'durablecache_phase{{name="sessions",namespace="{kube_namespace}",phase="Complete"}} 1.0' in metrics
    assert "durablecache_last_cutover_pause_milliseconds" in metrics
    assert_no_rbac_denials(op)
    print(f"operator killed in phase {killed_in}; cutover pause {status.get('lastCutoverPauseMs')} ms; "
          f"{app.load.acked} writes acknowledged")


def test_manual_cutover_waits_for_approval_and_resumes_after_operator_and_worker_die(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator]) -> None:
    source, target = make_server(), make_server()
    with contextlib.closing(source.client()) as c:
        seed(c, 2000)
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    op = operator_factory()
    with migrating(cluster, source, op, durablecache("orders", source, target, mode="manual")) as app:
        wait_for("Sync awaiting approval",
                 lambda: cluster.condition("orders", "Progressing").get("reason") == "AwaitingApproval", 60)
        # While it waits the worker goes on syncing: a write made through its proxy now reaches the
        # target. Only then is "no cutover yet" worth checking (the worker had its chance to act).
        host, port = cluster.status("orders")["endpoints"]["proxy"].rsplit(":", 1)
        with contextlib.closing(valkey.Valkey(host=host, port=int(port), socket_timeout=10)) as via_proxy, \
                contextlib.closing(target.client()) as on_target:
            via_proxy.set("written-while-awaiting-approval", "1")
            wait_for("a write made while awaiting approval to be synced to the target",
                     lambda: on_target.get("written-while-awaiting-approval") == b"1", 30)
        assert cluster.phase("orders") == "Sync", "a manual cutover must wait for approval"
        assert cluster.secret("app-cache")["port"] != str(target.port)
        old_workers = op.worker_pids()
        assert len(old_workers) == 1
        # Operator and worker (the pod) die together, as on a node failure.
        op.kill(signal.SIGKILL)
        op.kill_workers()
        op.start()
        wait_for("a new worker", lambda: (pids := op.worker_pids()) and pids != old_workers, 30)
        wait_for("the resumed worker to be back in sync",
                 lambda: "Repaired" in [r for _, r, _ in cluster.events("orders")], 60)
        wait_for("awaiting approval again",
                 lambda: cluster.condition("orders", "Progressing").get("reason") == "AwaitingApproval", 60)
        assert cluster.phase("orders") == "Sync"
        cluster.patch_spec("orders", {"cutover": {"approved": True}})
        wait_for("Complete", phase_seen(cluster, "orders", {"Complete"}), MIGRATION_TIMEOUT)
        wait_for("the endpoint Secret to point at the target",
                 lambda: cluster.secret("app-cache")["port"] == str(target.port), 20)
        writes_on_target(app, target)
    with contextlib.closing(target.client()) as c:
        lost = app.load.lost(c)
    assert lost == [], lost[:10]
    # The phase is written before its Event is posted: wait for the last one.
    reasons = wait_for("the Complete Event", lambda: "Complete" in (r := [reason for _, reason, _ in
                                                                         cluster.events("orders")]) and r, 30)
    for reason in ("AwaitingApproval", "WorkerRestarted", "RepairRequired", "Repaired", "CutoverApproved",
                   "Cutover", "Complete"):
        assert reason in reasons, (reason, reasons)
    # The resumed worker found the copy finished in the checkpoint: it did not copy everything again.
    checkpoint = cluster.status("orders")["checkpoint"]["migration"]
    assert checkpoint["flipped"] is True and checkpoint["phase"] == "Complete"
    # The approval made a new generation; the worker, which acted on it, says so at the top of the status.
    obj = cluster.get("orders")
    assert obj["metadata"]["generation"] > 1
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"], obj["status"]
    assert_no_rbac_denials(op)


def _moto_source(moto: str) -> str:
    """A non-durable source replication group as ElastiCache would show it."""
    ec = _elasticache(moto)
    rg_id = f"src-{uuid.uuid4().hex[:8]}"
    ec.create_cache_subnet_group(CacheSubnetGroupName=f"{rg_id}-subnets", CacheSubnetGroupDescription="test",
                                 SubnetIds=["subnet-1111", "subnet-2222"])
    rg = ec.create_replication_group(
        ReplicationGroupId=rg_id, ReplicationGroupDescription="source", Engine="valkey", EngineVersion="8.0",
        CacheNodeType="cache.r6g.large", ClusterMode="enabled", NumNodeGroups=1, ReplicasPerNodeGroup=1,
        TransitEncryptionEnabled=True, AtRestEncryptionEnabled=True, MultiAZEnabled=True,
        AutomaticFailoverEnabled=True, CacheSubnetGroupName=f"{rg_id}-subnets",
        SecurityGroupIds=["sg-0aaa1111"])["ReplicationGroup"]
    for member in rg["MemberClusters"]:
        ec.create_cache_cluster(CacheClusterId=member, ReplicationGroupId=rg_id, Engine="valkey",
                                EngineVersion="8.0", CacheNodeType="cache.r6g.large",
                                CacheSubnetGroupName=f"{rg_id}-subnets", SecurityGroupIds=["sg-0aaa1111"])
    ec.describe_replication_groups(ReplicationGroupId=rg_id)
    ec.describe_replication_groups(ReplicationGroupId=rg_id)
    return rg_id


def tls_secret_data(certs: dict[str, str]) -> dict[str, str]:
    """A kubernetes.io/tls Secret's data (tls.crt, tls.key) from the test CA's server certificate."""
    return {"tls.crt": Path(certs["cert"]).read_text(), "tls.key": Path(certs["key"]).read_text()}


def _elasticache(moto: str) -> Any:
    return boto3.client("elasticache", endpoint_url=moto, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _aws_durablecache(source_id: str, target_id: str, source_policy: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "DurableCache", "metadata": {"name": "sessions"},
        "spec": {"source": {"replicationGroupId": source_id},
                 "target": {"provider": "aws", "replicationGroupId": target_id, "durability": "sync",
                            "nodeType": "cache.r7g.large", "shards": 1, "replicasPerShard": 1},
                 "endpoint": {"secretName": "app-cache"},
                 # The moto source has TLS in transit: Preflight requires the proxy to serve TLS too.
                 "proxy": {"tls": {"secretName": "sessions-proxy-tls"}},
                 "deletionPolicy": {"source": source_policy}},
    }


def _start_aws_migration(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, namespace: str, moto: str,
        operator_factory: Callable[..., Operator], source_policy: str,
        proxy_tls: dict[str, str]) -> tuple[str, str, Cluster, Operator]:
    """A moto source, an operator talking to moto, and DurableCache "sessions" applied:
    (source id, target id, cluster, operator)."""
    source_id = _moto_source(moto)
    target_id = f"dst-{uuid.uuid4().hex[:8]}"
    cluster = Cluster(kube_api, kube_env, namespace)
    cluster.make_secret("sessions-proxy-tls", proxy_tls)
    op = operator_factory(**AWS_TEST_ENV, AWS_ENDPOINT_URL_ELASTICACHE=moto)
    op.start()
    cluster.apply(_aws_durablecache(source_id, target_id, source_policy))
    return source_id, target_id, cluster, op


def _delete_and_wait(kube_env: KubeEnv, namespace: str, name: str) -> None:
    kube_env.kubectl("delete", "dcache", name, "-n", namespace, "--wait=false")
    wait_for(f"DurableCache {name} to be gone",
             lambda: kube_env.kubectl("get", "dcache", name, "-n", namespace, check=False).returncode != 0, 60)


def test_aws_provider_creates_the_target_with_the_requested_durability(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str, moto_server: str,
        operator_factory: Callable[..., Operator], tls_certs: dict[str, str]) -> None:
    source_id, target_id, cluster, op = _start_aws_migration(
        kube_env, kube_api, kube_namespace, moto_server, operator_factory, source_policy="Delete",
        proxy_tls=tls_secret_data(tls_certs))
    wait_for("targetDurability", lambda: cluster.status("sessions").get("targetDurability"), 60)
    status = cluster.status("sessions")
    assert status["targetDurability"] == "sync"
    ec = _elasticache(moto_server)
    rg = ec.describe_replication_groups(ReplicationGroupId=target_id)["ReplicationGroups"][0]
    assert (rg["Durability"], rg["EffectiveDurability"]) == ("sync", "sync")
    assert rg["CacheNodeType"] == "cache.r7g.large"
    reasons = [reason for _, reason, _ in cluster.events("sessions")]
    assert {"Preflight", "Provision", "TargetCreated", "TargetReady"} <= set(reasons), reasons
    assert status["checkpoint"]["operator"]["target"]["tls"] is True
    # Deleting the DurableCache runs the finalizer's cleanup: the target is retained (policy Retain),
    # and so is the source, although its policy says Delete: the migration did not complete.
    _delete_and_wait(kube_env, kube_namespace, "sessions")
    assert ec.describe_replication_groups(ReplicationGroupId=target_id)["ReplicationGroups"]
    assert ec.describe_replication_groups(ReplicationGroupId=source_id)["ReplicationGroups"]
    kept = [m for t, reason, m in cluster.events("sessions") if reason == "SourceKept"]
    assert kept and "did not complete" in kept[0], cluster.events("sessions")
    assert_no_rbac_denials(op)
    json.dumps(status)  # the status is plain JSON (no leaked Python objects)


def test_deleting_a_completed_aws_migration_snapshots_then_deletes_the_source(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str, moto_server: str,
        operator_factory: Callable[..., Operator], tls_certs: dict[str, str]) -> None:
    """deletionPolicy.source SnapshotThenDelete. No migration can complete against moto (its endpoints
    serve no data), so the target is provisioned for real, then, with the operator and its worker
    stopped, the test records phase Complete in the status as a finished worker would; the operator
    is started again and the DurableCache deleted."""
    source_id, target_id, cluster, op = _start_aws_migration(
        kube_env, kube_api, kube_namespace, moto_server, operator_factory, source_policy="SnapshotThenDelete",
        proxy_tls=tls_secret_data(tls_certs))
    wait_for("the target to be provisioned",
             lambda: (cluster.status("sessions").get("checkpoint") or {}).get("operator", {}).get("provisioned"), 60)
    op.kill(signal.SIGTERM)
    op.kill_workers()
    cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, kube_namespace, PLURAL, "sessions", {"status": {"phase": "Complete"}})
    op.start()
    _delete_and_wait(kube_env, kube_namespace, "sessions")
    ec = _elasticache(moto_server)

    def source_gone() -> bool:   # it shows "deleting" first, as ElastiCache does (motoserver.py)
        try:
            ec.describe_replication_groups(ReplicationGroupId=source_id)
        except ec.exceptions.ReplicationGroupNotFoundFault:
            return True
        return False
    wait_for("the source to be deleted", source_gone, 10)
    snapshot = f"{source_id}-final-{kube_namespace}-sessions"
    (snap,) = ec.describe_snapshots(SnapshotName=snapshot)["Snapshots"]
    assert snap["ReplicationGroupId"] == source_id
    assert ec.describe_replication_groups(ReplicationGroupId=target_id)["ReplicationGroups"]   # target kept
    deleted = [m for t, reason, m in cluster.events("sessions") if reason == "SourceDeleted"]
    assert deleted and snapshot in deleted[0], cluster.events("sessions")
    assert_no_rbac_denials(op)


def chart_worker_args(kube_env: KubeEnv, release: OperatorRelease) -> list[str]:
    """The --worker-* flags the installed chart gives the operator."""
    manifest = kube_env.helm("get", "manifest", release.release, "--namespace", release.namespace).stdout
    (deploy,) = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Deployment"]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    return [a for a in args if a.startswith("--worker-")]


def _uid_now(read: Callable[[], Any]) -> str | None:
    """The object's uid, None while it does not exist."""
    try:
        return str(read().metadata.uid)
    except k8s_client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _gone(read: Callable[[], Any]) -> bool:
    try:
        read()
    except k8s_client.ApiException as exc:
        return exc.status == 404
    return False


def _kube_as(kubeconfig: Path) -> Any:
    """durablecache's own Kube wrapper (the worker's code path) authenticated by ``kubeconfig``."""
    from kubernetes import config as k8s_config

    from durablecache.k8s.kube import Kube

    return Kube(k8s_config.new_client_from_config(config_file=str(kubeconfig)))


def test_kubernetes_runner_creates_the_owned_worker_deployment_service_pdb_and_identity(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str, operator_release: OperatorRelease,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator],
        tls_certs: dict[str, str]) -> None:
    """The production runner with the chart's flags, under the chart's RBAC (the pods never run here: no
    kubelet): the join-token Secret, the coordinator and proxy Deployments, their Services and PDBs, and
    the coordinator's ServiceAccount and RoleBinding; the proxies' TLS Secret mounted, their announced
    host and resources, as the API server stored them."""
    source, target = make_server(), make_server()
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    cluster.make_secret("carts-proxy-tls", tls_secret_data(tls_certs))
    worker_args = chart_worker_args(kube_env, operator_release)
    flags = dict(a.split("=", 1) for a in worker_args)
    assert set(flags) == {"--worker-image", "--worker-cluster-role"}, worker_args
    worker_args.append("--worker-image-pull-secret=regcred")    # as the chart passes worker.imagePullSecrets
    op = operator_factory()
    op.start(runner="kubernetes", extra_args=tuple(worker_args))
    carts = durablecache("carts", source, target, mode="manual")
    carts["spec"]["proxy"] = {"tls": {"secretName": "carts-proxy-tls"}, "replicas": 3, "connectionBudget": 30000,
                              "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}
    cluster.apply(carts)
    apps, core, policy, rbac = (k8s_client.AppsV1Api(kube_api), k8s_client.CoreV1Api(kube_api),
                                k8s_client.PolicyV1Api(kube_api), k8s_client.RbacAuthorizationV1Api(kube_api))
    identity = "carts-durablecache-worker"
    readers = [lambda: apps.read_namespaced_deployment("carts-worker", kube_namespace),
               lambda: apps.read_namespaced_deployment("carts-proxy", kube_namespace),
               lambda: core.read_namespaced_service("carts-proxy", kube_namespace),
               lambda: core.read_namespaced_service("carts-coordinator", kube_namespace),
               lambda: policy.read_namespaced_pod_disruption_budget("carts-worker", kube_namespace),
               lambda: policy.read_namespaced_pod_disruption_budget("carts-proxy", kube_namespace),
               lambda: core.read_namespaced_service_account(identity, kube_namespace),
               lambda: rbac.read_namespaced_role_binding(identity, kube_namespace)]
    read_token = [lambda: core.read_namespaced_secret("carts-fleet-token", kube_namespace)]

    def created() -> Any:
        try:
            return [read() for read in [*readers, *read_token]]
        except k8s_client.ApiException:
            return None

    found = wait_for("the worker's objects", created, 30)
    deployment, proxies, service, coordinator, pdb, proxy_pdb, account, binding, token = found
    uid = cluster.get("carts")["metadata"]["uid"]
    for obj in found:
        (ref,) = obj.metadata.owner_references
        assert (ref.kind, ref.name, ref.uid, ref.controller) == ("DurableCache", "carts", uid, True)
    assert len(base64.b64decode(token.data["token"])) == 64
    # With the token, the fleet's TLS certificate and key (docs/ha.md, Transport).
    assert set(token.data) == {"token", "fleet-tls.crt", "fleet-tls.key"}
    fleet_key = base64.b64decode(token.data["fleet-tls.key"]).decode()
    assert fleet_key.startswith("-----BEGIN PRIVATE KEY-----")
    # The coordinator: one replica, no proxy of its own, listening for joins behind its Service.
    assert deployment.spec.replicas == 1 and deployment.spec.strategy.type == "Recreate"
    pod = deployment.spec.template.spec
    assert pod.service_account_name == identity
    assert [s.name for s in pod.image_pull_secrets] == ["regcred"]
    container = pod.containers[0]
    assert container.image == flags["--worker-image"]
    args = container.args
    assert args[args.index("--resource"):][:6] == ["--resource", f"{kube_namespace}/carts", "--proxies", "0",
                                                   "--coordinator-listen", "0.0.0.0:7000"]
    assert args[args.index("--fleet-tls-cert") + 1] == "/etc/durablecache/fleet/fleet-tls.crt"
    assert [(p.name, p.port) for p in coordinator.spec.ports] == [("fleet", 7000)]
    assert coordinator.spec.selector == deployment.spec.selector.match_labels
    assert pdb.spec.max_unavailable == 0
    # The proxies: spec.proxy.replicas pods joining the coordinator Service, TLS and the rest.
    assert proxies.spec.replicas == 3 and proxies.spec.strategy.rolling_update.max_unavailable == 0
    pod = proxies.spec.template.spec
    assert pod.automount_service_account_token is False and pod.service_account_name is None
    assert [s.name for s in pod.image_pull_secrets] == ["regcred"]
    assert sorted((c.topology_key, c.when_unsatisfiable) for c in pod.topology_spread_constraints) == [
        ("kubernetes.io/hostname", "ScheduleAnyway"), ("topology.kubernetes.io/zone", "ScheduleAnyway")]
    container = pod.containers[0]
    args = container.args
    assert args[args.index("--join") + 1] == f"carts-coordinator.{kube_namespace}.svc:7000"
    assert args[args.index("--connection-budget") + 1] == "30000"
    assert args[args.index("--announce") + 1] == f"carts-proxy.{kube_namespace}.svc"
    assert args[args.index("--fleet-tls-key") + 1] == "/etc/durablecache/fleet/fleet-tls.key"
    assert args[args.index("--tls-cert") + 1] == "/etc/durablecache/proxy-tls/tls.crt"
    assert args[args.index("--tls-key") + 1] == "/etc/durablecache/proxy-tls/tls.key"
    (volume,) = [v for v in pod.volumes if v.name == "proxy-tls"]
    assert (volume.secret.secret_name, volume.secret.default_mode) == ("carts-proxy-tls", 0o440)
    assert [(m.mount_path, m.read_only) for m in container.volume_mounts if m.name == "proxy-tls"] == \
        [("/etc/durablecache/proxy-tls", True)]
    (volume,) = [v for v in pod.volumes if v.name == "fleet-token"]
    assert volume.secret.secret_name == "carts-fleet-token"
    assert container.resources.requests == {"cpu": "500m", "memory": "256Mi"}
    assert service.spec.selector == proxies.spec.selector.match_labels
    assert proxy_pdb.spec.max_unavailable == 1
    assert (binding.role_ref.kind, binding.role_ref.name) == ("ClusterRole", flags["--worker-cluster-role"])
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [("ServiceAccount", identity, kube_namespace)]

    # A restarted operator finds the identity in place and changes nothing (idempotent).
    op.kill(signal.SIGTERM)
    op.start(runner="kubernetes", extra_args=tuple(worker_args))
    # The restarted operator has been through the identity once it recreates a deleted Service (the
    # identity comes first in every pass): only then is "it changed nothing" worth checking.
    core.delete_namespaced_service("carts-proxy", kube_namespace)
    wait_for("the restarted operator to recreate the Service",
             lambda: _uid_now(readers[1]) not in (None, service.metadata.uid), 30)
    after = rbac.read_namespaced_role_binding(identity, kube_namespace)
    assert after.metadata.uid == binding.metadata.uid
    assert after.metadata.resource_version == binding.metadata.resource_version
    assert core.read_namespaced_service_account(identity, kube_namespace).metadata.uid == account.metadata.uid
    # A binding changed behind its back (here: to another subject) is put back.
    rbac.patch_namespaced_role_binding(identity, kube_namespace, {"subjects": [
        {"kind": "ServiceAccount", "name": "default", "namespace": kube_namespace}]})
    wait_for("the RoleBinding's subject to be restored", lambda: [
        s.name for s in rbac.read_namespaced_role_binding(identity, kube_namespace).subjects] == [identity], 15)

    # A restarted operator generates no new token: the Secret is created once.
    assert core.read_namespaced_secret("carts-fleet-token", kube_namespace).data == token.data
    # A changed spec.proxy reaches the proxies' Deployment (a rolling update there); the coordinator's
    # Deployment is left alone (replacing it would be a lease takeover).
    cluster.patch_spec("carts", {"proxy": {"replicas": 4, "processes": 2}})

    def proxies_follow() -> Any:
        d = apps.read_namespaced_deployment("carts-proxy", kube_namespace)
        a = d.spec.template.spec.containers[0].args
        return d if d.spec.replicas == 4 and a[a.index("--processes") + 1] == "2" else None

    followed = wait_for("the proxy Deployment to follow spec.proxy", proxies_follow, 30).spec.template.spec
    new_args = followed.containers[0].args
    assert new_args[new_args.index("--join") + 1] == f"carts-coordinator.{kube_namespace}.svc:7000"
    assert [v.name for v in followed.volumes if v.name == "proxy-tls"] == ["proxy-tls"]   # the rest as before
    assert apps.read_namespaced_deployment("carts-worker", kube_namespace).metadata.generation == \
        deployment.metadata.generation
    # Deleting the DurableCache removes them (the finalizer; no garbage collector runs here). The
    # join-token Secret stays for the garbage collector (its owner reference, checked above): the
    # operator holds no delete on Secrets.
    kube_env.kubectl("delete", "dcache", "carts", "-n", kube_namespace, "--wait=false")
    wait_for("the worker objects and the DurableCache to be gone",
             lambda: all(_gone(r) for r in [*readers, lambda: cluster.get("carts")]), 30)
    assert token.metadata.uid == read_token[0]().metadata.uid
    assert base64.b64decode(token.data["token"]).decode() not in op.logs()   # never logged
    assert fleet_key.splitlines()[1] not in op.logs()                         # nor the key
    assert_no_rbac_denials(op)


def test_a_tls_source_without_a_proxy_certificate_is_refused_at_preflight(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator]) -> None:
    """Applications that reach the source over TLS must not be moved onto a plain-TCP proxy: without
    spec.proxy.tls.secretName the migration fails at Preflight, before anything is created, naming
    the field."""
    source, target = make_server(), make_server()
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    op = operator_factory()
    op.start()
    tls_source = durablecache("tlssrc", source, target, mode="manual")
    tls_source["spec"]["source"]["tls"] = {"enabled": True}
    cluster.apply(tls_source)
    wait_for("Preflight to fail", lambda: cluster.phase("tlssrc") == "Failed", 60)
    # The phase is written before the Event is posted: wait for the Event itself.
    failed = wait_for("the PreflightFailed Event", lambda: [
        m for kind, reason, m in cluster.events("tlssrc") if reason == "PreflightFailed"], 30)
    assert failed and failed[0].startswith("spec.proxy.tls.secretName: the source uses TLS"), cluster.events("tlssrc")
    assert not (cluster.status("tlssrc").get("checkpoint") or {}).get("operator", {}).get("provisioned")
    assert op.worker_pids() == []
    # Named, but the Secret is not there: refused as well, naming the field and the Secret.
    missing = durablecache("tlssrc2", source, target, mode="manual")
    missing["spec"]["source"]["tls"] = {"enabled": True}
    missing["spec"]["proxy"] = {"tls": {"secretName": "nope"}}
    cluster.apply(missing)
    wait_for("Preflight to fail", lambda: cluster.phase("tlssrc2") == "Failed", 60)
    # The phase is written before the Event is posted: wait for the Event itself.
    failed = wait_for("the PreflightFailed Event", lambda: [
        m for kind, reason, m in cluster.events("tlssrc2") if reason == "PreflightFailed"], 30)
    assert failed and "spec.proxy.tls.secretName" in failed[0] and "nope" in failed[0], cluster.events("tlssrc2")
    assert_no_rbac_denials(op)


def test_worker_identity_can_make_exactly_the_workers_calls(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str, operator_release: OperatorRelease,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator],
        sa_kubeconfig: ServiceAccountKubeconfig) -> None:
    """A token of the ServiceAccount the operator made for the worker (as its pod would get) does the
    worker's calls on its own DurableCache, Secrets, status and Events, and nothing else."""
    source, target = make_server(), make_server()
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    cluster.make_secret("carts-auth", {"token": "s3cret-token-value"})
    op = operator_factory()
    op.start(runner="kubernetes", extra_args=tuple(chart_worker_args(kube_env, operator_release)))
    cluster.apply(durablecache("carts", source, target, mode="manual"))
    identity = "carts-durablecache-worker"
    rbac = k8s_client.RbacAuthorizationV1Api(kube_api)
    wait_for("the worker's RoleBinding",
             lambda: not _gone(lambda: rbac.read_namespaced_role_binding(identity, kube_namespace)), 30)
    # Another namespace with a DurableCache and a Secret of its own: out of this worker's reach.
    other = f"{kube_namespace}-other"
    kube_env.kubectl("create", "namespace", other)
    kube_env.kubectl("apply", "-n", other, "-f", "-",
                     stdin=yaml.safe_dump(durablecache("carts", source, target, mode="manual")))
    k8s_client.CoreV1Api(kube_api).create_namespaced_secret(
        other, {"metadata": {"name": "carts-auth"}, "stringData": {"token": "other"}})

    kc = sa_kubeconfig(kube_namespace, identity)  # a TokenRequest token for the existing ServiceAccount
    who = kube_env.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=kc).stdout
    assert who == f"system:serviceaccount:{kube_namespace}:{identity}"

    def can_i(verb: str, resource: str, namespace: str, sub: str | None = None) -> bool:
        args = ["auth", "can-i", verb, resource, "-n", namespace, *([f"--subresource={sub}"] if sub else [])]
        out = kube_env.kubectl(*args, kubeconfig=kc, check=False).stdout.strip()
        assert out in ("yes", "no"), out
        return out == "yes"

    dc = "durablecaches.durablecache.dev"
    lease = "leases.coordination.k8s.io"
    allowed = [("get", f"{dc}/carts", None), ("patch", f"{dc}/carts", "status"), ("get", "secrets/carts-auth", None),
               ("create", "events", None), ("get", f"{lease}/carts-coordinator", None), ("create", lease, None),
               ("update", f"{lease}/carts-coordinator", None)]
    denied = [("list", "secrets", None), ("watch", "secrets", None), ("create", "secrets", None),
              ("patch", "secrets", None), ("delete", "secrets", None), ("list", dc, None), ("watch", dc, None),
              ("patch", dc, None), ("update", dc, None), ("delete", dc, None), ("create", dc, None),
              ("update", dc, "status"), ("create", "pods", None), ("create", "deployments.apps", None),
              ("create", "serviceaccounts/token", None), ("create", "rolebindings.rbac.authorization.k8s.io", None),
              ("patch", "services", None), ("list", lease, None), ("watch", lease, None), ("patch", lease, None),
              ("delete", lease, None)]
    assert [a for a in allowed if not can_i(a[0], a[1], kube_namespace, a[2])] == []
    assert [d for d in denied if can_i(d[0], d[1], kube_namespace, d[2])] == []
    # Nothing at all in another namespace.
    assert [a for a in allowed if can_i(a[0], a[1], other, a[2])] == []

    # The real calls, through the worker's own code (durablecache.k8s.kube.Kube).
    kube = _kube_as(kc)
    obj = kube.get(kube_namespace, "carts")
    assert obj is not None and obj["metadata"]["name"] == "carts"
    assert kube.secret_value(kube_namespace, "carts-auth", "token") == "s3cret-token-value"
    kube.patch_status(kube_namespace, "carts", {"dirtyBacklog": 7})
    assert cluster.status("carts")["dirtyBacklog"] == 7
    kube.event(obj, "Normal", "IdentityCheck", "posted by the worker's service account", "durablecache-worker")
    wait_for("the worker's Event", lambda: ("Normal", "IdentityCheck", "posted by the worker's service account")
             in cluster.events("carts"), 10)
    core, custom = k8s_client.CoreV1Api(kube.api), k8s_client.CustomObjectsApi(kube.api)
    refused = {
        "list secrets": lambda: core.list_namespaced_secret(kube_namespace),
        "read another namespace's Secret": lambda: core.read_namespaced_secret("carts-auth", other),
        "read another namespace's DurableCache": lambda: custom.get_namespaced_custom_object(
            GROUP, VERSION, other, PLURAL, "carts"),
        "patch another namespace's status": lambda: custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, other, PLURAL, "carts", {"status": {"dirtyBacklog": 1}}),
        "change the spec": lambda: custom.patch_namespaced_custom_object(
            GROUP, VERSION, kube_namespace, PLURAL, "carts", {"spec": {"cutover": {"approved": True}}}),
        "list DurableCaches": lambda: custom.list_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL),
    }
    statuses = {}
    for what, call in refused.items():
        try:
            call()
            statuses[what] = 200
        except k8s_client.ApiException as exc:
            statuses[what] = exc.status
    assert statuses == dict.fromkeys(refused, 403), statuses
    kube.api.close()
    assert_no_rbac_denials(op)


def test_aws_example_passes_the_providers_preflight(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/examples/sessions-aws.yaml, checked by the aws provider against a source that requires AUTH
    (as the example's source does): no violation. Without its target.authSecretRef it is refused."""
    from durablecache.k8s.spec import DurableCacheSpec
    from durablecache.providers.aws import AwsProvider
    from durablecache.providers.rules import MISSING_AUTH

    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    example = yaml.safe_load((Path(__file__).parents[2] / "docs" / "examples" / "sessions-aws.yaml").read_text())
    ec = boto3.client("elasticache", endpoint_url=moto_server, region_name="us-east-1")
    source_id = f"sessions-prod-{uuid.uuid4().hex[:6]}"
    ec.create_cache_subnet_group(CacheSubnetGroupName=f"{source_id}-subnets", CacheSubnetGroupDescription="test",
                                 SubnetIds=["subnet-1111", "subnet-2222"])
    ec.create_replication_group(
        ReplicationGroupId=source_id, ReplicationGroupDescription="source", Engine="valkey", EngineVersion="8.0",
        CacheNodeType="cache.r6g.large", ClusterMode="enabled", NumNodeGroups=2, ReplicasPerNodeGroup=1,
        TransitEncryptionEnabled=True, AtRestEncryptionEnabled=True, MultiAZEnabled=True,
        AutomaticFailoverEnabled=True, CacheSubnetGroupName=f"{source_id}-subnets",
        AuthToken="source-token-0123456789")
    example["spec"]["source"]["replicationGroupId"] = source_id
    example["metadata"]["uid"] = "0"
    provider = AwsProvider(source_id, endpoint_url=moto_server, region="us-east-1")
    assert provider.describe_source().auth_token_enabled, "the source must require AUTH for this check to mean anything"
    # The operator reads the token from target.authSecretRef's Secret; any valid token stands in here.
    assert example["spec"]["target"]["authSecretRef"]["name"]
    result = provider.preflight(DurableCacheSpec.parse(example).target_spec("target-token-0123456789"))
    assert result.ok, result.message()
    refused = provider.preflight(DurableCacheSpec.parse(example).target_spec(None))
    assert [v.field for v in refused.violations] == ["target.authSecretRef"]
    assert MISSING_AUTH in refused.message()


def test_a_second_operator_instance_pauses_instead_of_acting_twice(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator]) -> None:
    """kopf peering: an accidental second instance (e.g. during a rollout) with the same peering makes
    both pause; when it goes away, the remaining one resumes."""
    source, target = make_server(), make_server()
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    first, second = operator_factory(), operator_factory(POD_ID="durablecache-operator-second")
    first.start()
    second.start()
    wait_for("both instances to see each other and pause",
             lambda: "pausing" in (first.logs() + second.logs()).lower(), 60)
    # The control: an instance outside the peering (standalone), watching a namespace of its own,
    # started after the paused two and given its resource after theirs. Once it has acted, the paused
    # instances have had at least as long to act: only then is "they did not" worth checking.
    control_ns = f"{kube_namespace}-control"
    kube_env.kubectl("create", "namespace", control_ns)
    control = operator_factory(namespace=control_ns, standalone=True, POD_ID="durablecache-operator-control")
    control.start()
    control_cluster = Cluster(kube_api, kube_env, control_ns)
    cluster.apply(durablecache("paused", source, target, mode="manual"))
    control_cluster.apply(durablecache("control", make_server(), make_server(), mode="manual"))
    wait_for("the control instance to act on its resource", lambda: control_cluster.phase("control") is not None, 60)
    assert cluster.phase("paused") is None, "a paused operator acted on the resource"
    assert first.worker_pids() == [] and second.worker_pids() == []
    second.kill(signal.SIGTERM)  # a clean exit removes its peering record
    wait_for("the remaining instance to resume and act", lambda: cluster.phase("paused") is not None, 60)
    assert second.worker_pids() == []
    assert_no_rbac_denials(first)
