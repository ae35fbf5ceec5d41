"""Where the proxy/syncer worker (``durablecache worker``) runs.

``KubernetesRunner`` is production: a one-replica Deployment (Recreate, so two syncers never race on
one key), a Service the applications reach the proxy through, and a PodDisruptionBudget, all owned by
the DurableCache. With a worker ClusterRole (the chart's ``<release>-worker``) each migration's worker
also gets its own identity in the DurableCache's namespace: a ServiceAccount and a RoleBinding of that
ClusterRole, owned by the DurableCache too, so a worker can reach only its own namespace.
``LocalProcessRunner`` runs the same worker command as a local process: the test
cluster has no kubelet, so it stands in for the pod (a process that survives an operator restart,
exactly like a pod does).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .. import logs
from ..ports import free_port
from . import GROUP
from .kube import Kube, owner_reference
from .spec import TLS_CERT_KEY, TLS_KEY_KEY, DurableCacheSpec

log = logs.get("durablecache.k8s.runner")
PROXY_PORT = 6379
STOP_TIMEOUT = 10.0
PROXY_TLS_DIR = "/etc/durablecache/proxy-tls"   # spec.proxy.tls.secretName, mounted in the worker pod
POD_GROUP = 10001                               # the image's group (Dockerfile): may read the TLS key


class WorkloadRunner(Protocol):
    async def ensure(self, obj: dict[str, Any]) -> str:
        """Make sure the worker runs: "running" (nothing done), "started" or "restarted"."""

    def proxy_address(self, obj: dict[str, Any]) -> tuple[str, int]:
        """Where applications reach the proxy."""

    async def remove(self, obj: dict[str, Any]) -> None:
        """Stop the worker and delete what was created for it. Idempotent."""


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return {"app.kubernetes.io/name": "durablecache-worker", "app.kubernetes.io/managed-by": "durablecache",
            f"{GROUP}/name": obj["metadata"]["name"]}


def worker_args(obj: dict[str, Any], listen: str, announce: str | None = None, tls_dir: str | None = None) -> list[str]:
    """The worker's command line; ``announce``: the host its proxies name in cluster mode; ``tls_dir``:
    where the proxy's certificate and key (a kubernetes.io/tls Secret) are mounted."""
    meta = obj["metadata"]
    out = ["--log-json", "--log-level=info", "worker", "--resource", f"{meta['namespace']}/{meta['name']}",
           "--listen", listen]
    if announce:
        out += ["--announce", announce]
    if tls_dir:
        out += ["--tls-cert", f"{tls_dir}/{TLS_CERT_KEY}", "--tls-key", f"{tls_dir}/{TLS_KEY_KEY}"]
    return out


def worker_identity_name(obj: dict[str, Any]) -> str:
    """The worker's ServiceAccount and RoleBinding (both in the DurableCache's namespace)."""
    return f"{obj['metadata']['name']}-durablecache-worker"


class KubernetesRunner:
    """``service_account``: run the workers as this existing ServiceAccount (the user made it and its
    RBAC). ``cluster_role``: give each worker its own ServiceAccount bound to this ClusterRole in the
    DurableCache's namespace. Neither: the namespace's default ServiceAccount."""

    def __init__(self, kube: Kube, image: str, service_account: str | None = None,
                 cluster_role: str | None = None, image_pull_secrets: Sequence[str] = ()):
        if service_account and cluster_role:
            raise ValueError("a worker service account and a worker cluster role exclude each other")
        self.kube = kube
        self.image = image
        self.service_account = service_account
        self.cluster_role = cluster_role
        # Secrets are namespaced: these must exist in each DurableCache's namespace.
        self.image_pull_secrets = list(image_pull_secrets)

    def names(self, obj: dict[str, Any]) -> dict[str, str]:
        """Everything created for a worker, in the order it is removed (the pod before its identity)."""
        name = obj["metadata"]["name"]
        out = {"Deployment": f"{name}-worker", "Service": f"{name}-proxy", "PodDisruptionBudget": f"{name}-worker"}
        if self.cluster_role:
            out.update(RoleBinding=worker_identity_name(obj), ServiceAccount=worker_identity_name(obj))
        return out

    def _meta(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {"namespace": obj["metadata"]["namespace"], "labels": _labels(obj),
                "ownerReferences": [owner_reference(obj)]}

    def identity(self, obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The worker's ServiceAccount and its RoleBinding (empty without a worker ClusterRole)."""
        if not self.cluster_role:
            return {}
        ns, name = obj["metadata"]["namespace"], worker_identity_name(obj)
        meta = {"name": name, **self._meta(obj)}
        return {
            "ServiceAccount": {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
            # A RoleBinding, not a ClusterRoleBinding: the ClusterRole's rights hold in this namespace only.
            "RoleBinding": {
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": self.cluster_role},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
            },
        }

    def pod_service_account(self, obj: dict[str, Any]) -> str | None:
        return worker_identity_name(obj) if self.cluster_role else self.service_account

    def manifests(self, obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
        names = self.names(obj)
        labels = _labels(obj)
        meta = self._meta(obj)
        proxy = DurableCacheSpec.parse(obj).proxy
        # Clients reconnect to, and verify, the host CLUSTER SLOTS names: the Service's, not the pod's.
        announce = proxy.announce_host or self.proxy_address(obj)[0]
        tls_dir = PROXY_TLS_DIR if proxy.tls_secret_name else None
        pod: dict[str, Any] = {
            "containers": [{
                "name": "worker", "image": self.image, "command": ["durablecache"],
                "args": worker_args(obj, f"0.0.0.0:{PROXY_PORT}", announce, tls_dir),
                "ports": [{"name": "valkey", "containerPort": PROXY_PORT}],
                "readinessProbe": {"tcpSocket": {"port": "valkey"}, "periodSeconds": 5},
                "env": [{"name": "HOME", "value": "/tmp"}],
                "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
            # Long enough for a cutover in flight to finish or abort (maxWritePause <= 30s).
            "terminationGracePeriodSeconds": 60,
        }
        container = pod["containers"][0]
        if proxy.resources:
            container["resources"] = {kind: dict(values) for kind, values in proxy.resources.items()}
        if proxy.tls_secret_name:
            # Only the certificate and key, readable by the pod's group (not world-readable).
            pod["volumes"].append({"name": "proxy-tls", "secret": {
                "secretName": proxy.tls_secret_name, "defaultMode": 0o440,
                "items": [{"key": TLS_CERT_KEY, "path": TLS_CERT_KEY}, {"key": TLS_KEY_KEY, "path": TLS_KEY_KEY}]}})
            container["volumeMounts"].append({"name": "proxy-tls", "mountPath": PROXY_TLS_DIR, "readOnly": True})
            pod["securityContext"] = {"fsGroup": POD_GROUP}
        account = self.pod_service_account(obj)
        if account:
            pod["serviceAccountName"] = account
        if self.image_pull_secrets:
            pod["imagePullSecrets"] = [{"name": name} for name in self.image_pull_secrets]
        return {
            "Deployment": {
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": names["Deployment"], **meta},
                # One replica, Recreate: one syncer per migration, never two racing on a key.
                "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels}, "spec": pod}},
            },
            "Service": {
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": names["Service"], **meta},
                "spec": {"selector": labels, "ports": [{"name": "valkey", "port": PROXY_PORT,
                                                         "targetPort": "valkey"}]},
            },
            # A node drain must not evict the proxy mid-migration (it would cost a full verify-and-repair).
            "PodDisruptionBudget": {
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": names["PodDisruptionBudget"], **meta},
                "spec": {"maxUnavailable": 0, "selector": {"matchLabels": labels}},
            },
        }

    async def ensure(self, obj: dict[str, Any]) -> str:
        ns = obj["metadata"]["namespace"]
        # The identity first: a pod naming a ServiceAccount that does not exist yet is refused.
        for kind, body in self.identity(obj).items():
            outcome = await asyncio.to_thread(self.kube.apply_identity, kind, ns, body)
            if outcome != "unchanged":
                log.info("worker identity " + outcome, kind=kind, name=body["metadata"]["name"], namespace=ns)
        created = False
        for kind, body in self.manifests(obj).items():
            created |= await asyncio.to_thread(self.kube.create_if_missing, kind, ns, body)
        return "started" if created else "running"

    def proxy_address(self, obj: dict[str, Any]) -> tuple[str, int]:
        return f"{self.names(obj)['Service']}.{obj['metadata']['namespace']}.svc", PROXY_PORT

    async def remove(self, obj: dict[str, Any]) -> None:
        ns = obj["metadata"]["namespace"]
        for kind, name in self.names(obj).items():
            await asyncio.to_thread(self.kube.delete_quietly, kind, ns, name)


class LocalProcessRunner:
    """The worker as a local process (tests: there is no kubelet to run the worker pod).

    Pid and port live in ``state_dir`` so that a restarted operator finds the worker its previous
    incarnation started, as it would find the Deployment, instead of starting a second syncer."""

    def __init__(self, state_dir: str | os.PathLike[str], env: dict[str, str] | None = None):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = env if env is not None else dict(os.environ)
        self.children: dict[int, subprocess.Popen[bytes]] = {}

    def _file(self, obj: dict[str, Any], suffix: str) -> Path:
        meta = obj["metadata"]
        return self.dir / f"{meta['namespace']}.{meta['name']}.{suffix}"

    def _port(self, obj: dict[str, Any]) -> int:
        path = self._file(obj, "port")
        if path.exists():
            return int(path.read_text())
        port = free_port()
        path.write_text(str(port))
        return port

    def pid(self, obj: dict[str, Any]) -> int | None:
        path = self._file(obj, "pid")
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
        return None

    def alive(self, pid: int | None) -> bool:
        if pid is None:
            return False
        child = self.children.get(pid)
        if child is not None:
            return child.poll() is None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        # A zombie is dead; a recycled pid running something else is not our worker.
        return stat.rsplit(")", 1)[-1].split()[0] != "Z" and b"worker" in cmdline

    async def ensure(self, obj: dict[str, Any]) -> str:
        old = self.pid(obj)
        if self.alive(old):
            return "running"
        port = self._port(obj)
        args = [sys.executable, "-m", "durablecache.cli", *worker_args(obj, f"127.0.0.1:{port}")]
        log_path = self._file(obj, "log")
        with log_path.open("ab") as out:
            # Own session: the worker outlives an operator that is killed, as a pod would.
            child = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        self.children[child.pid] = child
        self._file(obj, "pid").write_text(str(child.pid))
        log.info("worker process started", pid=child.pid, port=port, resource=obj["metadata"]["name"])
        return "restarted" if old is not None else "started"

    def proxy_address(self, obj: dict[str, Any]) -> tuple[str, int]:
        return "127.0.0.1", self._port(obj)

    async def remove(self, obj: dict[str, Any]) -> None:
        pid = self.pid(obj)
        if self.alive(pid):
            assert pid is not None
            await asyncio.to_thread(self._stop, pid)
        self._file(obj, "pid").unlink(missing_ok=True)

    def _stop(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and self.alive(pid):
            time.sleep(0.1)
        if self.alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        child = self.children.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=STOP_TIMEOUT)
