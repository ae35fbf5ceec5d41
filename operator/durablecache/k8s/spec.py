"""A DurableCache's spec, parsed once: ``DurableCacheSpec.parse(obj)`` checks every field and fills
every default in one place (the CRD's schema defaults agree: tests/test_spec.py), and everything else
takes its settings from it — the engine's ``MigrationOptions``, the provider's ``TargetSpec``, the
endpoints. A bad field raises ``SpecError`` naming it. Secrets are read here and handed on in memory,
never written anywhere."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ..errors import UsageError
from ..iamauth import IamAuth
from ..options import (
    DEFAULTS,
    OPERATOR_AFTER_CUTOVER,
    OPERATOR_CUTOVER,
    SETTING_NAMES,
    MigrationOptions,
    OptionError,
    parse_duration,
)
from ..providers import Provider, StaticProvider, TargetSpec
from ..urls import Endpoint
from .kube import Kube

T = TypeVar("T")
DEFAULT_ENGINE_VERSION = "9.0"


class SpecError(UsageError):
    """A DurableCache field that cannot be used; the message starts with the field's path."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


# -- reading one field --------------------------------------------------------------------------
def _get(d: dict[str, Any], key: str, path: str, kind: type[T] | tuple[type, ...], default: Any = None) -> Any:
    value = d.get(key, default)
    if value is None:
        return default
    # bool is an int in Python; a YAML `true` where a number belongs is still refused.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SpecError(f"{path}.{key}", f"must be a {want}, not {value!r}")
    return value


def _obj(d: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    return dict(_get(d, key, path, dict, {}))


def _choice(d: dict[str, Any], key: str, path: str, choices: tuple[str, ...], default: str) -> str:
    value = _get(d, key, path, str, default)
    if value not in choices:
        raise SpecError(f"{path}.{key}", f"must be one of {', '.join(choices)}, not {value!r}")
    return str(value)


def _duration(d: dict[str, Any], key: str, path: str, default: float | None) -> float | None:
    text = _get(d, key, path, str)
    if text is None:
        return default
    try:
        return parse_duration(text, f"{path}.{key}")
    except UsageError:
        raise SpecError(f"{path}.{key}", f"not a duration: {text!r} (use e.g. 100ms, 30s, 1m30s)") from None


# -- the parts ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str
    username_key: str | None = None

    @classmethod
    def parse(cls, d: dict[str, Any] | None, path: str, default_key: str) -> SecretKeyRef | None:
        if d is None:
            return None
        if not isinstance(d, dict):
            raise SpecError(path, f"must be an object, not {d!r}")
        name = _get(d, "name", path, str)
        if not name:
            raise SpecError(f"{path}.name", "is required")
        return cls(name=name, key=_get(d, "key", path, str, default_key),
                   username_key=_get(d, "usernameKey", path, str))


@dataclasses.dataclass(frozen=True)
class TlsSpec:
    enabled: bool | None = None      # None: as the replication group reports (aws), plain TCP (static)
    server_name: str | None = None   # SNI and the certificate name to verify; None: the host
    ca: SecretKeyRef | None = None

    @classmethod
    def parse(cls, d: dict[str, Any], path: str) -> TlsSpec:
        return cls(enabled=_get(d, "enabled", path, bool), server_name=_get(d, "serverName", path, str) or None,
                   ca=SecretKeyRef.parse(d.get("caSecretRef"), f"{path}.caSecretRef", "ca.crt"))


@dataclasses.dataclass(frozen=True)
class HostPort:
    host: str
    port: int


def _endpoints(d: dict[str, Any], path: str) -> tuple[HostPort, ...]:
    items = _get(d, "endpoints", path, list, [])
    out = []
    for i, item in enumerate(items):
        where = f"{path}.endpoints[{i}]"
        if not isinstance(item, dict):
            raise SpecError(where, f"must be an object with host and port, not {item!r}")
        host, port = _get(item, "host", where, str), _get(item, "port", where, int)
        if not host:
            raise SpecError(f"{where}.host", "is required")
        if port is None or not 1 <= port <= 65535:
            raise SpecError(f"{where}.port", f"must be a TCP port (1-65535), not {port!r}")
        out.append(HostPort(host, port))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class IamSpec:
    """spec.<side>.auth.iam: ElastiCache IAM authentication for DurableCache's own connections."""

    user_id: str
    cache_name: str | None = None
    region: str | None = None
    serverless: bool = False

    @classmethod
    def parse(cls, d: dict[str, Any], path: str) -> IamSpec | None:
        if not d:
            return None
        user = _get(d, "userId", path, str)
        if not user:
            raise SpecError(f"{path}.userId", "is required")
        return cls(user_id=user, cache_name=_get(d, "cacheName", path, str) or None,
                   region=_get(d, "region", path, str) or None, serverless=bool(_get(d, "serverless", path, bool)))


@dataclasses.dataclass(frozen=True)
class SideSpec:
    """What source and target have in common: where they are, TLS and AUTH."""

    replication_group_id: str | None
    endpoints: tuple[HostPort, ...]
    tls: TlsSpec
    auth: SecretKeyRef | None
    iam: IamSpec | None

    @classmethod
    def parse_common(cls, d: dict[str, Any], path: str) -> dict[str, Any]:
        return {"replication_group_id": _get(d, "replicationGroupId", path, str) or None,
                "endpoints": _endpoints(d, path), "tls": TlsSpec.parse(_obj(d, "tls", path), f"{path}.tls"),
                "auth": SecretKeyRef.parse(d.get("authSecretRef"), f"{path}.authSecretRef", "token"),
                "iam": IamSpec.parse(_obj(_obj(d, "auth", path), "iam", f"{path}.auth"), f"{path}.auth.iam")}

    def __post_init__(self) -> None:
        if self.auth is not None and self.iam is not None:
            raise SpecError("spec.auth", "set at most one of authSecretRef or auth.iam per side")

    def first_endpoint(self) -> Endpoint:
        """The first static endpoint with the spec's TLS settings (no credentials)."""
        first = self.endpoints[0]
        return Endpoint(host=first.host, port=first.port, tls=bool(self.tls.enabled),
                        server_name=self.tls.server_name)

    def name(self) -> str:
        """For SOURCE/TARGET in `kubectl get`: the replication group ID, or the first endpoint's
        HOST:PORT with "+N" for N more endpoints."""
        if self.replication_group_id:
            return self.replication_group_id
        if not self.endpoints:
            return ""
        first, more = self.endpoints[0], len(self.endpoints) - 1
        return f"{first.host}:{first.port}" + (f" +{more}" if more else "")


@dataclasses.dataclass(frozen=True)
class SourceSpec(SideSpec):
    @classmethod
    def parse(cls, d: dict[str, Any]) -> SourceSpec:
        out = cls(**cls.parse_common(d, "spec.source"))
        if bool(out.replication_group_id) == bool(out.endpoints):
            raise SpecError("spec.source", "set exactly one of replicationGroupId or endpoints")
        return out


@dataclasses.dataclass(frozen=True)
class TargetOverrides:
    subnet_group: str | None = None
    security_group_ids: tuple[str, ...] | None = None
    kms_key_id: str | None = None
    maintenance_window: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, d: dict[str, Any], path: str) -> TargetOverrides:
        sgs = _get(d, "securityGroupIds", path, list)
        return cls(subnet_group=_get(d, "subnetGroup", path, str), security_group_ids=tuple(sgs) if sgs else None,
                   kms_key_id=_get(d, "kmsKeyId", path, str),
                   maintenance_window=_get(d, "maintenanceWindow", path, str),
                   tags={str(k): str(v) for k, v in _get(d, "tags", path, dict, {}).items()})


@dataclasses.dataclass(frozen=True)
class TargetSpecPart(SideSpec):
    provider: str = "aws"
    durability: str = "sync"
    node_type: str | None = None
    engine_version: str = DEFAULT_ENGINE_VERSION
    shards: int = 1
    replicas_per_shard: int = 1
    overrides: TargetOverrides = dataclasses.field(default_factory=TargetOverrides)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> TargetSpecPart:
        path = "spec.target"
        if d.get("durability") is None:
            raise SpecError(f"{path}.durability", "is required (sync or async)")
        out = cls(**cls.parse_common(d, path),
                  provider=_choice(d, "provider", path, ("aws", "static"), "aws"),
                  durability=_choice(d, "durability", path, ("sync", "async"), "sync"),
                  node_type=_get(d, "nodeType", path, str),
                  engine_version=_get(d, "engineVersion", path, str, DEFAULT_ENGINE_VERSION),
                  shards=_get(d, "shards", path, int, 1),
                  replicas_per_shard=_get(d, "replicasPerShard", path, int, 1),
                  overrides=TargetOverrides.parse(_obj(d, "overrides", path), f"{path}.overrides"))
        if out.provider == "static" and not out.endpoints:
            raise SpecError(f"{path}.endpoints", "target.provider static needs target.endpoints")
        return out

    @property
    def is_aws(self) -> bool:
        return self.provider == "aws"


@dataclasses.dataclass(frozen=True)
class CutoverSpec:
    mode: str = OPERATOR_CUTOVER
    approved: bool = False
    max_write_pause: float = DEFAULTS.max_write_pause
    max_key_pause: float = DEFAULTS.max_key_pause
    drain_budget: float | None = DEFAULTS.drain_budget
    rollback_window: float = DEFAULTS.rollback_window
    rollback: bool = False

    @classmethod
    def parse(cls, d: dict[str, Any]) -> CutoverSpec:
        p, dflt = "spec.cutover", cls()
        return cls(mode=_choice(d, "mode", p, ("auto", "manual"), dflt.mode),
                   approved=_get(d, "approved", p, bool, False),
                   max_write_pause=_duration(d, "maxWritePause", p, dflt.max_write_pause) or 0.0,
                   max_key_pause=_duration(d, "maxKeyPause", p, dflt.max_key_pause) or 0.0,
                   drain_budget=_duration(d, "drainBudget", p, dflt.drain_budget),
                   rollback_window=_duration(d, "rollbackWindow", p, dflt.rollback_window) or 0.0,
                   rollback=_get(d, "rollback", p, bool, False))


@dataclasses.dataclass(frozen=True)
class RouteInSpec:
    settle_period: float = DEFAULTS.gate_settle
    allowed_clients: tuple[str, ...] = ()

    @classmethod
    def parse(cls, d: dict[str, Any]) -> RouteInSpec:
        p = "spec.routeIn"
        return cls(settle_period=_duration(d, "settlePeriod", p, DEFAULTS.gate_settle) or 0.0,
                   allowed_clients=tuple(str(c) for c in _get(d, "allowedClients", p, list, [])))


@dataclasses.dataclass(frozen=True)
class RepairSpec:
    max_destructive_share: float = DEFAULTS.repair_max_share
    accept_destructive: bool = DEFAULTS.accept_destructive_repair

    @classmethod
    def parse(cls, d: dict[str, Any]) -> RepairSpec:
        p = "spec.repair"
        return cls(max_destructive_share=float(_get(d, "maxDestructiveShare", p, (int, float),
                                                    DEFAULTS.repair_max_share)),
                   accept_destructive=_get(d, "acceptDestructive", p, bool, DEFAULTS.accept_destructive_repair))


@dataclasses.dataclass(frozen=True)
class Workload:
    kind: str
    name: str


@dataclasses.dataclass(frozen=True)
class EndpointSpec:
    secret_name: str | None = None
    service_name: str | None = None
    restart_workloads: tuple[Workload, ...] = ()
    # What the applications use after cutover: the target itself, or the proxy kept as a long-lived
    # front end (standalone-mode clients of a cluster-mode target; MigrationOptions.after_cutover).
    after_cutover: str = OPERATOR_AFTER_CUTOVER

    @classmethod
    def parse(cls, d: dict[str, Any]) -> EndpointSpec:
        p = "spec.endpoint"
        workloads = []
        for i, item in enumerate(_get(d, "restartWorkloads", p, list, [])):
            where = f"{p}.restartWorkloads[{i}]"
            if not isinstance(item, dict):
                raise SpecError(where, f"must be an object with kind and name, not {item!r}")
            workloads.append(Workload(kind=_choice(item, "kind", where, ("Deployment", "StatefulSet", "DaemonSet"),
                                                   "Deployment"), name=_get(item, "name", where, str, "")))
        out = cls(secret_name=_get(d, "secretName", p, str), service_name=_get(d, "serviceName", p, str),
                  restart_workloads=tuple(workloads),
                  after_cutover=_choice(d, "afterCutover", p, ("target", "proxy"), OPERATOR_AFTER_CUTOVER))
        if not out.secret_name and not out.service_name:
            raise SpecError(p, "needs secretName and/or serviceName")
        return out


@dataclasses.dataclass(frozen=True)
class DeletionPolicy:
    source: str = "Retain"
    target: str = "Retain"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> DeletionPolicy:
        p = "spec.deletionPolicy"
        return cls(source=_choice(d, "source", p, ("Retain", "SnapshotThenDelete", "Delete"), "Retain"),
                   target=_choice(d, "target", p, ("Retain", "Delete"), "Retain"))


@dataclasses.dataclass(frozen=True)
class SeedingSpec:
    mode: str = "none"
    snapshot_name: str | None = None

    @classmethod
    def parse(cls, d: dict[str, Any]) -> SeedingSpec:
        p = "spec.seeding"
        return cls(mode=_choice(d, "mode", p, ("none", "snapshot"), "none"),
                   snapshot_name=_get(d, "snapshotName", p, str))


AUTO_PROCESSES = 0          # ProxySpec.processes for "auto": one per CPU the pod may run on
MAX_PROCESSES = 64
# Two proxy pods by default: one drained or lost node leaves the applications a proxy to reconnect to.
DEFAULT_PROXY_REPLICAS = 2
MAX_PROXY_REPLICAS = 64
RESOURCE_KINDS = ("requests", "limits")
TLS_CERT_KEY, TLS_KEY_KEY = "tls.crt", "tls.key"    # a kubernetes.io/tls Secret's keys (cert-manager's too)


@dataclasses.dataclass(frozen=True)
class ProxySpec:
    """spec.proxy: how the applications reach the proxies, and how many of them run."""

    replicas: int = DEFAULT_PROXY_REPLICAS  # proxy pods, each joined to the coordinator (docs/ha.md)
    processes: int = 1                  # per pod; AUTO_PROCESSES: one per CPU
    max_clients: int | None = None      # per proxy process; None: no limit of the proxy's own
    max_clients_total: int | None = None    # all proxy pods together, an equal share each; None: no limit
    # Per proxy process, checked at each cutover attempt's PREPARE (docs/limits.md); 0: 90% of maxclients.
    connection_budget: int = DEFAULTS.connection_budget
    announce_host: str | None = None    # None: the proxy Service's DNS name (the runner's)
    tls_secret_name: str | None = None
    resources: dict[str, dict[str, str | int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> ProxySpec:
        p = "spec.proxy"
        replicas = _get(d, "replicas", p, int, DEFAULT_PROXY_REPLICAS)
        if not 1 <= replicas <= MAX_PROXY_REPLICAS:
            raise SpecError(f"{p}.replicas", f"must be 1 to {MAX_PROXY_REPLICAS}, not {replicas}")
        max_clients = _get(d, "maxClients", p, int)
        if max_clients is not None and max_clients < 1:
            raise SpecError(f"{p}.maxClients", f"must be at least 1, not {max_clients}")
        total = _get(d, "maxClientsTotal", p, int)
        processes = _processes(d, p)
        least = replicas * (processes if processes != AUTO_PROCESSES else 1)
        if total is not None and total < least:
            raise SpecError(f"{p}.maxClientsTotal", f"must give each of the {least} proxy processes at least one "
                                                     f"client, not {total}")
        budget = _get(d, "connectionBudget", p, int, DEFAULTS.connection_budget)
        tls = _obj(d, "tls", p)
        return cls(replicas=replicas, processes=processes, max_clients=max_clients, max_clients_total=total,
                   connection_budget=budget, announce_host=_get(d, "announceHost", p, str) or None,
                   tls_secret_name=_get(tls, "secretName", f"{p}.tls", str) or None,
                   resources=_resources(_obj(d, "resources", p), f"{p}.resources"))


@dataclasses.dataclass(frozen=True)
class CoordinatorSpec:
    """spec.coordinator: the coordinator pod (the worker: phases, copy, syncer, cutover)."""

    resources: dict[str, dict[str, str | int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> CoordinatorSpec:
        return cls(resources=_resources(_obj(d, "resources", "spec.coordinator"), "spec.coordinator.resources"))


def _processes(d: dict[str, Any], path: str) -> int:
    value = _get(d, "processes", path, (int, str), 1)
    if value == "auto":
        return AUTO_PROCESSES
    if isinstance(value, str) or not 1 <= value <= MAX_PROCESSES:
        raise SpecError(f"{path}.processes", f"must be 1 to {MAX_PROCESSES} or auto, not {value!r}")
    return int(value)


def _resources(d: dict[str, Any], path: str) -> dict[str, dict[str, str | int]]:
    """A container's requests and limits: quantities as the API server takes them (it checks their form)."""
    out: dict[str, dict[str, str | int]] = {}
    for kind in d:
        if kind not in RESOURCE_KINDS:
            raise SpecError(f"{path}.{kind}", f"is not a resource setting ({' or '.join(RESOURCE_KINDS)})")
        values = _get(d, kind, path, dict, {})
        for name, q in values.items():
            if isinstance(q, bool) or not isinstance(q, (str, int)):
                raise SpecError(f"{path}.{kind}.{name}", f"must be a quantity (e.g. 500m, 1Gi), not {q!r}")
        out[kind] = {str(n): q for n, q in values.items()}
    return out


# -- the whole ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DurableCacheSpec:
    namespace: str
    name: str
    generation: int | None
    source: SourceSpec
    target: TargetSpecPart
    endpoint: EndpointSpec
    cutover: CutoverSpec = CutoverSpec()
    route_in: RouteInSpec = RouteInSpec()
    repair: RepairSpec = RepairSpec()
    deletion_policy: DeletionPolicy = DeletionPolicy()
    seeding: SeedingSpec = SeedingSpec()
    proxy: ProxySpec = ProxySpec()
    coordinator: CoordinatorSpec = CoordinatorSpec()

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> DurableCacheSpec:
        """Every field checked, every default filled; SpecError names the first bad field."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            raise SpecError("spec", "is required")
        for part in ("source", "target", "endpoint"):
            if not isinstance(spec.get(part), dict):
                raise SpecError(f"spec.{part}", "is required")
        out = cls(namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""),
                  generation=meta.get("generation"),
                  source=SourceSpec.parse(spec["source"]), target=TargetSpecPart.parse(spec["target"]),
                  endpoint=EndpointSpec.parse(spec["endpoint"]),
                  cutover=CutoverSpec.parse(_obj(spec, "cutover", "spec")),
                  route_in=RouteInSpec.parse(_obj(spec, "routeIn", "spec")),
                  repair=RepairSpec.parse(_obj(spec, "repair", "spec")),
                  deletion_policy=DeletionPolicy.parse(_obj(spec, "deletionPolicy", "spec")),
                  seeding=SeedingSpec.parse(_obj(spec, "seeding", "spec")),
                  proxy=ProxySpec.parse(_obj(spec, "proxy", "spec")),
                  coordinator=CoordinatorSpec.parse(_obj(spec, "coordinator", "spec")))
        out.migration_options()   # the engine's own checks, named after the spec's fields
        out._check_seeding()
        return out

    def _check_seeding(self) -> None:
        """Snapshot seeding restores an ElastiCache target from an ElastiCache snapshot of the source (the
        CRD says the same; this also guards a spec that reached the operator without it)."""
        if self.seeding.mode != "snapshot":
            return
        if not self.target.is_aws:
            raise SpecError("spec.seeding.mode", "snapshot needs spec.target.provider aws (the static provider "
                            "creates nothing to restore into); use mode none")
        if not self.source.replication_group_id:
            raise SpecError("spec.seeding.mode", "snapshot needs an ElastiCache source "
                            "(spec.source.replicationGroupId) to take the snapshot of")

    @property
    def migration_id(self) -> str:
        """Tags the target as this migration's own (adoption after a restart, safe deletion)."""
        return f"{self.namespace}/{self.name}"

    def migration_options(self, gate_timeout: float = DEFAULTS.gate_timeout) -> MigrationOptions:
        """The engine's settings; the gate timeout is the worker's (it has no spec field)."""
        c, r = self.cutover, self.repair
        try:
            return MigrationOptions(
                cutover=c.mode, max_write_pause=c.max_write_pause, drain_budget=c.drain_budget,
                max_key_pause=c.max_key_pause, rollback_window=c.rollback_window,
                allow_clients=list(self.route_in.allowed_clients), gate_settle=self.route_in.settle_period,
                gate_timeout=gate_timeout, repair_max_share=r.max_destructive_share,
                accept_destructive_repair=r.accept_destructive, after_cutover=self.endpoint.after_cutover,
                connection_budget=self.proxy.connection_budget)
        except OptionError as exc:
            raise SpecError(SETTING_NAMES[exc.field][0], exc.named(0).split(" ", 1)[1]) from None

    def target_spec(self, auth_token: str | None = None) -> TargetSpec:
        t, o = self.target, self.target.overrides
        return TargetSpec(
            replication_group_id=self.target_name(), migration_id=self.migration_id, durability=t.durability,
            node_type=t.node_type, engine_version=t.engine_version, shards=t.shards,
            replicas_per_shard=t.replicas_per_shard, subnet_group=o.subnet_group,
            security_group_ids=o.security_group_ids, kms_key_id=o.kms_key_id,
            maintenance_window=o.maintenance_window, tags=dict(o.tags), auth_token=auth_token,
            description=f"DurableCache {self.migration_id}")

    def target_name(self) -> str:
        """The aws provider names the target after the resource when replicationGroupId is unset."""
        if self.target.is_aws:
            return self.target.replication_group_id or self.name
        return self.target.name()

    def side_names(self) -> dict[str, str]:
        """status.sourceName and status.targetName."""
        return {"sourceName": self.source.name(), "targetName": self.target_name()}

    def make_provider(self, ready_timeout: float) -> Provider:
        """aws: the ElastiCache API (region, credentials and endpoint from the standard AWS chain, e.g.
        IRSA); static: the endpoints in the spec."""
        if self.target.is_aws:
            from ..providers.aws import AwsProvider  # boto3 only when an aws migration exists

            if not self.source.replication_group_id:
                raise SpecError("spec.source.replicationGroupId", "target.provider aws needs it (static source "
                                "endpoints cannot be described by the ElastiCache API)")
            return AwsProvider(self.source.replication_group_id, ready_timeout=ready_timeout, first_delay=2.0,
                               max_delay=30.0)
        targets = [dataclasses.replace(self.target.first_endpoint(), host=e.host, port=e.port)
                   for e in self.target.endpoints]
        return StaticProvider(self.source.first_endpoint(), targets, source_name=self.source.name().split(" ")[0])

    def iam_auth(self, side: str) -> IamAuth | None:
        """The IAM credentials of one side (``source`` / ``target``); the cache defaults to the side's
        replication group (for an aws target, the one the provider creates)."""
        part: SideSpec = self.source if side == "source" else self.target
        if part.iam is None:
            return None
        cache = part.iam.cache_name or part.replication_group_id
        if not cache and isinstance(part, TargetSpecPart) and part.is_aws:
            cache = self.target_name()
        if not cache:
            raise SpecError(f"spec.{side}.auth.iam.cacheName",
                            f"is required (no {side}.replicationGroupId to default to)")
        return IamAuth(user=part.iam.user_id, cache=cache, region=part.iam.region, serverless=part.iam.serverless)

    def ignored_settings(self) -> list[str]:
        """Settings the CRD accepts that the operator does not act on yet (docs/limits.md), each as the
        message of the Warning event that says so: the user learns it at Preflight, not at the end."""
        return []   # none at present (spec.seeding was, until snapshot seeding was wired: docs/aws.md)


# -- endpoints and credentials ------------------------------------------------------------------
def credentials(kube: Kube, namespace: str, side: SideSpec) -> tuple[str | None, str | None]:
    """(username, password) from the side's authSecretRef, or (None, None)."""
    ref = side.auth
    if not ref:
        return None, None
    password = kube.secret_value(namespace, ref.name, ref.key)
    username = kube.secret_value(namespace, ref.name, ref.username_key) if ref.username_key else None
    return username, password


def endpoint_dict(ep: Endpoint) -> dict[str, Any]:
    """An endpoint as stored in status.checkpoint.operator (no credentials)."""
    out: dict[str, Any] = {"host": ep.host, "port": ep.port, "tls": ep.tls}
    if ep.server_name:
        out["serverName"] = ep.server_name
    return out


def stored_endpoint(d: dict[str, Any]) -> Endpoint:
    """The inverse of endpoint_dict."""
    return Endpoint(host=d["host"], port=int(d["port"]), tls=bool(d.get("tls")), server_name=d.get("serverName"))


def with_tls(ep: Endpoint, tls: TlsSpec) -> Endpoint:
    """An endpoint the provider found, with what the spec says about TLS (enabled, server name)."""
    if tls.enabled is not None:
        ep = dataclasses.replace(ep, tls=tls.enabled)
    if tls.server_name:
        ep = dataclasses.replace(ep, server_name=tls.server_name)
    return ep
