"""Where a migration's coordinator (``durablecache worker``) and its proxies (``durablecache proxy
--join``) run (docs/ha.md#in-kubernetes).

``KubernetesRunner`` is production, all owned by the DurableCache:

- the join-token Secret ``NAME-fleet-token``, generated once: proxies present its token when they
  join, and it is the bearer token of their admin APIs; it also holds the fleet's self-signed
  certificate and key (fleettls.py), with which the mark channel and the admin APIs speak TLS;
- the coordinator: Deployment ``NAME-worker`` (one replica, Recreate; its coordinator Lease makes a
  second one a standby), with no proxy of its own, listening for joins on the ``NAME-coordinator``
  Service, and a PodDisruptionBudget that lets no drain evict it mid-migration;
- the proxies: Deployment ``NAME-proxy`` (spec.proxy.replicas pods spread over zones and nodes, each
  running spec.proxy.processes processes that join the coordinator), the ``NAME-proxy`` Service the
  applications use, and a PodDisruptionBudget that lets one proxy pod go at a time.

With a worker ClusterRole (the chart's ``<release>-worker``) each coordinator also gets its own
identity in the DurableCache's namespace: a ServiceAccount and a RoleBinding of that ClusterRole. The
proxy pods need no API access and mount no token.

``LocalProcessRunner`` runs the same commands as local processes (the test cluster has no kubelet): the
coordinator, and one process group per proxy "pod", restarted when it dies as a Deployment would. Like
pods, they survive an operator restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .. import logs
from ..fleettls import make_certificate
from ..ports import free_port
from . import GROUP
from .kube import Kube, owner_reference
from .spec import AUTO_PROCESSES, TLS_CERT_KEY, TLS_KEY_KEY, CoordinatorSpec, DurableCacheSpec, ProxySpec

log = logs.get("durablecache.k8s.runner")
PROXY_PORT = 6379
COORDINATOR_PORT = 7000                         # the fleet's join and mark channel (fleet.py)
ADMIN_PORT = 7001                               # each proxy pod's admin API (+1 per further process)
STOP_TIMEOUT = 10.0
PROXY_TLS_DIR = "/etc/durablecache/proxy-tls"   # spec.proxy.tls.secretName, mounted in the proxy pods
TOKEN_DIR = "/etc/durablecache/fleet"           # the join-token Secret, mounted in every pod
TOKEN_KEY = "token"
# The fleet's certificate and key in the same Secret (not the kubernetes.io/tls key names: the Secret
# is Opaque, and these are not the certificate clients see).
FLEET_CERT_KEY, FLEET_KEY_KEY = "fleet-tls.crt", "fleet-tls.key"
FLEET_FILES = (f"{TOKEN_DIR}/{FLEET_CERT_KEY}", f"{TOKEN_DIR}/{FLEET_KEY_KEY}")
POD_GROUP = 10001                               # the image's group (Dockerfile): may read the mounted keys
COORDINATOR, PROXY = "coordinator", "proxy"
ROLE_LABEL = "app.kubernetes.io/component"
TEMPLATE_HASH = f"{GROUP}/template-hash"        # on each Deployment: the replicas and pod template asked for


class WorkloadRunner(Protocol):
    async def ensure(self, obj: dict[str, Any]) -> str:
        """Make sure the coordinator and its proxies run: "running" (the coordinator was running),
        "started" or "restarted" (the coordinator)."""

    def proxy_address(self, obj: dict[str, Any]) -> tuple[str, int]:
        """Where applications reach the proxies."""

    async def remove(self, obj: dict[str, Any]) -> None:
        """Stop the coordinator and the proxies and delete what was created for them. Idempotent."""


def _container_resources(wanted: dict[str, dict[str, str | int]]) -> dict[str, dict[str, str | int]]:
    """A container's ``resources`` from the spec's (a copy: the manifest must not share the spec's dicts)."""
    return {kind: dict(values) for kind, values in wanted.items()}


def _labels(obj: dict[str, Any], role: str) -> dict[str, str]:
    """The pods of one role of one DurableCache (the Services' and budgets' selectors)."""
    return {"app.kubernetes.io/name": f"durablecache-{'worker' if role == COORDINATOR else 'proxy'}",
            ROLE_LABEL: role, "app.kubernetes.io/managed-by": "durablecache",
            f"{GROUP}/name": obj["metadata"]["name"]}


def worker_args(obj: dict[str, Any], coordinator_listen: str, token_file: str = f"{TOKEN_DIR}/{TOKEN_KEY}",
                fleet_tls: tuple[str, str] = FLEET_FILES) -> list[str]:
    """The coordinator's command line: no proxy of its own, proxies join at ``coordinator_listen``, over
    TLS with the fleet's certificate and key (the files ``fleet_tls`` names)."""
    meta = obj["metadata"]
    return ["--log-json", "--log-level=info", "worker", "--resource", f"{meta['namespace']}/{meta['name']}",
            "--proxies", "0", "--coordinator-listen", coordinator_listen, "--join-token-file", token_file,
            *_fleet_tls_args(fleet_tls)]


def _fleet_tls_args(files: tuple[str, str]) -> list[str]:
    return ["--fleet-tls-cert", files[0], "--fleet-tls-key", files[1]]


def proxy_args(proxy: ProxySpec, join: str, token_file: str, *, listen: str, admin: str, proxy_id: str,
               announce: str | None = None, tls_dir: str | None = None,
               fleet_tls: tuple[str, str] = FLEET_FILES) -> list[str]:
    """One proxy pod's command line: join the coordinator at ``join``; serve clients at ``listen`` with
    spec.proxy's processes, TLS (the certificate and key mounted at ``tls_dir``), client limit and
    connection budget; name ``announce`` in cluster mode. ``admin`` is where the coordinator reaches
    it, so its host must be an address the coordinator can connect to (the pod IP). The join, the marks
    and the admin API speak TLS with the fleet's certificate and key (the files ``fleet_tls`` names)."""
    processes = "auto" if proxy.processes == AUTO_PROCESSES else str(proxy.processes)
    out = ["--log-json", "--log-level=info", "proxy", "--join", join, "--join-token-file", token_file,
           *_fleet_tls_args(fleet_tls),
           "--listen", listen, "--admin", admin, "--proxy-id", proxy_id, "--processes", processes]
    if announce:
        out += ["--announce", announce]
    if tls_dir:
        out += ["--tls-cert", f"{tls_dir}/{TLS_CERT_KEY}", "--tls-key", f"{tls_dir}/{TLS_KEY_KEY}"]
    if proxy.max_clients:
        out += ["--max-clients", str(proxy.max_clients)]
    if proxy.max_clients_total:     # this pod's share; the proxy command splits it between its processes
        out += ["--max-clients-total", str(proxy.max_clients_total // proxy.replicas)]
    if proxy.connection_budget:
        out += ["--connection-budget", str(proxy.connection_budget)]
    return out


def worker_identity_name(obj: dict[str, Any]) -> str:
    """The coordinator's ServiceAccount and RoleBinding (both in the DurableCache's namespace)."""
    return f"{obj['metadata']['name']}-durablecache-worker"


def token_secret_name(obj: dict[str, Any]) -> str:
    return f"{obj['metadata']['name']}-fleet-token"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:20]


def new_token() -> str:
    return secrets.token_hex(32)


def fleet_secret_data(obj: dict[str, Any]) -> dict[str, str]:
    """What the join-token Secret holds: a new token, and a new certificate and key for the fleet's
    internal channels (only the first ever made is kept: the Secret is created once)."""
    meta = obj["metadata"]
    cert, key = make_certificate(f"durablecache fleet {meta['namespace']}/{meta['name']}")
    return {TOKEN_KEY: new_token(), FLEET_CERT_KEY: cert, FLEET_KEY_KEY: key}


class KubernetesRunner:
    """``service_account``: run the coordinators as this existing ServiceAccount (the user made it and
    its RBAC). ``cluster_role``: give each coordinator its own ServiceAccount bound to this ClusterRole
    in the DurableCache's namespace. Neither: the namespace's default ServiceAccount."""

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

    def names(self, obj: dict[str, Any]) -> list[tuple[str, str]]:
        """(kind, name) of everything the operator deletes when the migration ends, in that order: the
        pods before their Services, budgets and identity. The join-token Secret is not among them: the
        operator may not delete Secrets (least privilege); its owner reference lets the garbage
        collector take it with the DurableCache."""
        name = obj["metadata"]["name"]
        out = [("Deployment", f"{name}-proxy"), ("Deployment", f"{name}-worker"),
               ("Service", f"{name}-proxy"), ("Service", f"{name}-coordinator"),
               ("PodDisruptionBudget", f"{name}-proxy"), ("PodDisruptionBudget", f"{name}-worker")]
        if self.cluster_role:
            out += [("RoleBinding", worker_identity_name(obj)), ("ServiceAccount", worker_identity_name(obj))]
        return out

    def _meta(self, obj: dict[str, Any], name: str, role: str) -> dict[str, Any]:
        return {"name": name, "namespace": obj["metadata"]["namespace"], "labels": _labels(obj, role),
                "ownerReferences": [owner_reference(obj)]}

    def identity(self, obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The coordinator's ServiceAccount and its RoleBinding (empty without a worker ClusterRole)."""
        if not self.cluster_role:
            return {}
        ns, name = obj["metadata"]["namespace"], worker_identity_name(obj)
        meta = self._meta(obj, name, COORDINATOR)
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

    def coordinator_address(self, obj: dict[str, Any]) -> str:
        """HOST:PORT where the proxies join: the coordinator Service."""
        return f"{obj['metadata']['name']}-coordinator.{obj['metadata']['namespace']}.svc:{COORDINATOR_PORT}"

    def manifests(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        """Everything ``ensure`` creates, in the order it creates them (the Secret the pods mount first)."""
        name = obj["metadata"]["name"]
        spec = DurableCacheSpec.parse(obj)
        proxy = spec.proxy
        return [
            {"apiVersion": "v1", "kind": "Secret", "metadata": self._meta(obj, token_secret_name(obj), COORDINATOR),
             "type": "Opaque", "stringData": fleet_secret_data(obj)},
            self._service(obj, f"{name}-coordinator", COORDINATOR, "fleet", COORDINATOR_PORT),
            # A drain must not evict the coordinator mid-migration: its proxies refuse writes until a
            # new one holds the lease.
            self._budget(obj, f"{name}-worker", COORDINATOR, 0),
            self._deployment(obj, f"{name}-worker", COORDINATOR, 1, self._coordinator_pod(obj, spec.coordinator),
                             # One pod at a time; the Lease fences a second that starts meanwhile.
                             {"type": "Recreate"}),
            self._service(obj, f"{name}-proxy", PROXY, "valkey", PROXY_PORT),
            # One proxy pod at a time may go: a rolled proxy leaves cleanly (no repair), its clients
            # reconnect to the others.
            self._budget(obj, f"{name}-proxy", PROXY, 1),
            self._deployment(obj, f"{name}-proxy", PROXY, proxy.replicas, self._proxy_pod(obj, proxy),
                             # A new pod first: the applications never have fewer proxies than asked for.
                             {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        ]

    def _service(self, obj: dict[str, Any], name: str, role: str, port_name: str, port: int) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service", "metadata": self._meta(obj, name, role),
                "spec": {"selector": _labels(obj, role),
                         "ports": [{"name": port_name, "port": port, "targetPort": port_name}]}}

    def _budget(self, obj: dict[str, Any], name: str, role: str, unavailable: int) -> dict[str, Any]:
        return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": self._meta(obj, name, role),
                "spec": {"maxUnavailable": unavailable, "selector": {"matchLabels": _labels(obj, role)}}}

    def _deployment(self, obj: dict[str, Any], name: str, role: str, replicas: int, pod: dict[str, Any],
                    strategy: dict[str, Any]) -> dict[str, Any]:
        labels = _labels(obj, role)
        template = {"metadata": {"labels": labels}, "spec": pod}
        meta = self._meta(obj, name, role)
        # What the operator last asked for, to tell a changed spec.proxy from the API server's defaults.
        meta["annotations"] = {TEMPLATE_HASH: _digest({"replicas": replicas, "template": template})}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                "spec": {"replicas": replicas, "strategy": strategy, "selector": {"matchLabels": labels},
                         "template": template}}

    def _pod(self, container: dict[str, Any], grace: int) -> dict[str, Any]:
        """What both pods share: a non-root, read-only container; /tmp; the join token and the fleet's
        certificate and key, readable by the image's group only."""
        container.update({
            "image": self.image, "command": ["durablecache"],
            "env": [{"name": "HOME", "value": "/tmp"}, *container.get("env", [])],
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                             {"name": "fleet-token", "mountPath": TOKEN_DIR, "readOnly": True}]})
        pod: dict[str, Any] = {
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                        {"name": "fleet-token", "secret": {"secretName": "", "defaultMode": 0o440, "items": [
                            {"key": k, "path": k} for k in (TOKEN_KEY, FLEET_CERT_KEY, FLEET_KEY_KEY)]}}],
            "securityContext": {"fsGroup": POD_GROUP},
            "terminationGracePeriodSeconds": grace,
        }
        if self.image_pull_secrets:
            pod["imagePullSecrets"] = [{"name": name} for name in self.image_pull_secrets]
        return pod

    def _coordinator_pod(self, obj: dict[str, Any], coordinator: CoordinatorSpec) -> dict[str, Any]:
        container: dict[str, Any] = {
            "name": "worker", "args": worker_args(obj, f"0.0.0.0:{COORDINATOR_PORT}"),
            "ports": [{"name": "fleet", "containerPort": COORDINATOR_PORT}],
            # Ready once it holds the lease and listens for joins: only then does the coordinator
            # Service send proxies to it.
            "readinessProbe": {"tcpSocket": {"port": "fleet"}, "periodSeconds": 5}}
        if coordinator.resources:
            container["resources"] = _container_resources(coordinator.resources)
        # Long enough for a cutover in flight to finish or abort (maxWritePause <= 30s).
        pod = self._pod(container, 60)
        pod["volumes"][1]["secret"]["secretName"] = token_secret_name(obj)
        account = self.pod_service_account(obj)
        if account:
            pod["serviceAccountName"] = account
        return pod

    def _proxy_pod(self, obj: dict[str, Any], proxy: ProxySpec) -> dict[str, Any]:
        # Clients reconnect to, and verify, the host CLUSTER SLOTS names: the Service's, not the pod's.
        announce = proxy.announce_host or self.proxy_address(obj)[0]
        tls_dir = PROXY_TLS_DIR if proxy.tls_secret_name else None
        # The admin API listens on the pod IP, and READY announces exactly that address: the
        # coordinator connects to it whatever the network does to the join connection's source address.
        args = proxy_args(proxy, self.coordinator_address(obj), f"{TOKEN_DIR}/{TOKEN_KEY}",
                          listen=f"0.0.0.0:{PROXY_PORT}", admin=f"$(POD_IP):{ADMIN_PORT}", proxy_id="$(POD_NAME)",
                          announce=announce, tls_dir=tls_dir)
        field = [("POD_NAME", "metadata.name"), ("POD_IP", "status.podIP")]
        container: dict[str, Any] = {
            "name": "proxy", "args": args,
            "env": [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": f}}} for n, f in field],
            "ports": [{"name": "valkey", "containerPort": PROXY_PORT}, {"name": "admin", "containerPort": ADMIN_PORT}],
            "readinessProbe": {"tcpSocket": {"port": "valkey"}, "periodSeconds": 5}}
        if proxy.resources:
            container["resources"] = _container_resources(proxy.resources)
        # A clean leave (SIGTERM) drains within 5 s (proxyjoin.STOP_DRAIN); the rest is margin.
        pod = self._pod(container, 30)
        pod["volumes"][1]["secret"]["secretName"] = token_secret_name(obj)
        if tls_dir:
            # Only the certificate and key, readable by the pod's group (not world-readable).
            pod["volumes"].append({"name": "proxy-tls", "secret": {
                "secretName": proxy.tls_secret_name, "defaultMode": 0o440,
                "items": [{"key": TLS_CERT_KEY, "path": TLS_CERT_KEY}, {"key": TLS_KEY_KEY, "path": TLS_KEY_KEY}]}})
            container["volumeMounts"].append({"name": "proxy-tls", "mountPath": PROXY_TLS_DIR, "readOnly": True})
        # The proxies call no API: no token in their pods.
        pod["automountServiceAccountToken"] = False
        # Spread over zones (best effort: a cluster in one zone still schedules) and nodes, so that one
        # zone or node lost leaves the applications proxies to reconnect to.
        selector = {"matchLabels": _labels(obj, PROXY)}
        pod["topologySpreadConstraints"] = [
            {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": selector}
            for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname")]
        return pod

    async def ensure(self, obj: dict[str, Any]) -> str:
        ns = obj["metadata"]["namespace"]
        # The identity first: a pod naming a ServiceAccount that does not exist yet is refused.
        for kind, body in self.identity(obj).items():
            outcome = await asyncio.to_thread(self.kube.apply_identity, kind, ns, body)
            if outcome != "unchanged":
                log.info("worker identity " + outcome, kind=kind, name=body["metadata"]["name"], namespace=ns)
        created = False
        for body in self.manifests(obj):
            # (Nothing of the body is logged: the Secret's carries the token.)
            if await asyncio.to_thread(self.kube.create_if_missing, body["kind"], ns, body):
                created = True
            elif body["kind"] == "Deployment" and body["metadata"]["labels"][ROLE_LABEL] == PROXY:
                await self._update_proxies(ns, body)
        return "started" if created else "running"

    async def _update_proxies(self, ns: str, body: dict[str, Any]) -> None:
        """A changed spec.proxy (replicas, processes, limits ...) reaches the running proxies: a rolling
        update (a new pod first; a rolled proxy drains and leaves, docs/ha.md). The coordinator's
        Deployment stays as it was created: replacing it would be a lease takeover."""
        if await asyncio.to_thread(self.kube.update_deployment, ns, body, TEMPLATE_HASH):
            log.info("proxy deployment updated", name=body["metadata"]["name"], namespace=ns,
                     replicas=body["spec"]["replicas"])

    def proxy_address(self, obj: dict[str, Any]) -> tuple[str, int]:
        return f"{obj['metadata']['name']}-proxy.{obj['metadata']['namespace']}.svc", PROXY_PORT

    async def remove(self, obj: dict[str, Any]) -> None:
        ns = obj["metadata"]["namespace"]
        for kind, name in self.names(obj):
            await asyncio.to_thread(self.kube.delete_quietly, kind, ns, name)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only this user may read (or write)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class LocalProcessRunner:
    """The coordinator and its proxy pods as local processes (tests: there is no kubelet to run pods).

    The coordinator is one process; each proxy "pod" is a ``durablecache proxy --join`` process group
    of its own (its ``--processes`` children with it), listening on the one shared client port with
    SO_REUSEPORT (the kernel spreading connections over them stands in for the Service) and with its
    admin API on a loopback address of its own, 127.0.0.<2+i> (its "pod IP"). A pod that died is
    started again at the next ``ensure``, as its Deployment would. Pids, ports, the join token and the
    fleet's certificate and key live in ``state_dir`` so that a restarted operator finds what its
    previous incarnation started, as it would find the Deployments, instead of starting a second
    syncer; the proxies' files are in
    ``state_dir/proxies``. ``kube`` reads spec.proxy.tls's Secret for the proxies (a pod mounts it)."""

    def __init__(self, state_dir: str | os.PathLike[str], env: dict[str, str] | None = None,
                 kube: Kube | None = None):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proxy_dir = self.dir / "proxies"
        self.proxy_dir.mkdir(exist_ok=True)
        self.env = env if env is not None else dict(os.environ)
        self.kube = kube
        self.children: dict[int, subprocess.Popen[bytes]] = {}

    def _file(self, obj: dict[str, Any], suffix: str, where: Path | None = None) -> Path:
        meta = obj["metadata"]
        return (where or self.dir) / f"{meta['namespace']}.{meta['name']}.{suffix}"

    def _port(self, obj: dict[str, Any], suffix: str = "port") -> int:
        path = self._file(obj, suffix)
        if path.exists():
            return int(path.read_text())
        port = free_port()
        path.write_text(str(port))
        return port

    def _secret_file(self, obj: dict[str, Any], suffix: str, make: Any) -> str:
        """A file only this user may read, written once (``make()`` gives its text)."""
        path = self._file(obj, suffix, self.proxy_dir)
        if not path.exists():
            _write_private(path, make())
        return str(path)

    def token_file(self, obj: dict[str, Any]) -> str:
        """The fleet's join token (the Secret's stand-in)."""
        return self._secret_file(obj, "token", new_token)

    def fleet_tls_files(self, obj: dict[str, Any]) -> tuple[str, str]:
        """The fleet's certificate and key (the Secret's stand-in): owner-only files, made once (again
        only if one of the two is missing: a certificate is useless without its key)."""
        cert, key = (self._file(obj, suffix, self.proxy_dir) for suffix in (FLEET_CERT_KEY, FLEET_KEY_KEY))
        if not (cert.exists() and key.exists()):
            cert_pem, key_pem = make_certificate(f"durablecache fleet {obj['metadata']['name']}")
            _write_private(key, key_pem)
            _write_private(cert, cert_pem)
        return str(cert), str(key)

    def pid(self, obj: dict[str, Any], proxy: int | None = None) -> int | None:
        """The coordinator's pid, or proxy pod ``proxy``'s (the leader of its process group)."""
        path = self._pid_file(obj, proxy)
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
        return None

    def _pid_file(self, obj: dict[str, Any], proxy: int | None) -> Path:
        return self._file(obj, "pid") if proxy is None else self._file(obj, f"{proxy}.pid", self.proxy_dir)

    def alive(self, pid: int | None, role: bytes = b"worker") -> bool:
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
        # A zombie is dead; a recycled pid running something else is not ours.
        return stat.rsplit(")", 1)[-1].split()[0] != "Z" and role in cmdline.split(b"\0")

    def _start(self, args: list[str], log_path: Path, pid_path: Path) -> int:
        with log_path.open("ab") as out:
            # Own session: it outlives an operator that is killed, as a pod would, and a "pod" is
            # killed whole (its process group).
            child = subprocess.Popen([sys.executable, "-m", "durablecache.cli", *args], stdout=out,
                                     stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.children[child.pid] = child
        pid_path.write_text(str(child.pid))
        return child.pid

    async def ensure(self, obj: dict[str, Any]) -> str:
        old = self.pid(obj)
        outcome = "running"
        if not self.alive(old):
            args = worker_args(obj, f"127.0.0.1:{self._port(obj, 'fleet-port')}", self.token_file(obj),
                               self.fleet_tls_files(obj))
            pid = self._start(args, self._file(obj, "log"), self._pid_file(obj, None))
            log.info("worker process started", pid=pid, resource=obj["metadata"]["name"])
            outcome = "restarted" if old is not None else "started"
        await asyncio.to_thread(self._ensure_proxies, obj)
        return outcome

    def _ensure_proxies(self, obj: dict[str, Any]) -> None:
        proxy = DurableCacheSpec.parse(obj).proxy
        for i in range(proxy.replicas):
            old = self.pid(obj, i)
            if self.alive(old, b"proxy"):
                continue
            name = f"{obj['metadata']['name']}-proxy-{i}"
            args = proxy_args(proxy, f"127.0.0.1:{self._port(obj, 'fleet-port')}", self.token_file(obj),
                              listen=f"127.0.0.1:{self._port(obj)}", admin=f"127.0.0.{2 + i}:0", proxy_id=name,
                              tls_dir=self._tls_dir(obj, proxy), fleet_tls=self.fleet_tls_files(obj))
            args.append("--reuse-port")      # the "pods" share the one client port
            pid = self._start(args, self._file(obj, f"{i}.log", self.proxy_dir), self._pid_file(obj, i))
            log.info("proxy pod " + ("restarted" if old is not None else "started"), pid=pid, proxy=name)

    def _tls_dir(self, obj: dict[str, Any], proxy: ProxySpec) -> str | None:
        """spec.proxy.tls's Secret as files, as a pod would have it mounted."""
        if not proxy.tls_secret_name or self.kube is None:
            return None
        kube, ns, secret = self.kube, obj["metadata"]["namespace"], proxy.tls_secret_name
        tls_dir = self.proxy_dir / f"{ns}.{obj['metadata']['name']}.tls"
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        for key in (TLS_CERT_KEY, TLS_KEY_KEY):
            _write_private(tls_dir / key, kube.secret_value(ns, secret, key))
        return str(tls_dir)

    def proxy_address(self, obj: dict[str, Any]) -> tuple[str, int]:
        return "127.0.0.1", self._port(obj)

    def proxy_pids(self, obj: dict[str, Any]) -> list[int]:
        """The proxy pods running now (their process group leaders)."""
        return [pid for i in range(self._proxy_slots(obj))
                if (pid := self.pid(obj, i)) is not None and self.alive(pid, b"proxy")]

    def _proxy_slots(self, obj: dict[str, Any]) -> int:
        meta = obj["metadata"]
        return len(list(self.proxy_dir.glob(f"{meta['namespace']}.{meta['name']}.*.pid")))

    async def remove(self, obj: dict[str, Any]) -> None:
        # The proxies first: they leave the fleet cleanly while their coordinator still listens.
        for i in range(self._proxy_slots(obj)):
            pid = self.pid(obj, i)
            if self.alive(pid, b"proxy"):
                assert pid is not None
                await asyncio.to_thread(self._stop, pid, b"proxy")
            self._pid_file(obj, i).unlink(missing_ok=True)
        pid = self.pid(obj)
        if self.alive(pid):
            assert pid is not None
            await asyncio.to_thread(self._stop, pid, b"worker")
        self._file(obj, "pid").unlink(missing_ok=True)

    def _stop(self, pid: int, role: bytes) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and self.alive(pid, role):
            time.sleep(0.1)
        if self.alive(pid, role):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        child = self.children.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=STOP_TIMEOUT)
