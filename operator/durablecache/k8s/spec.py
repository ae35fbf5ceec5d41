"""From a DurableCache manifest to what the engine and the providers take: endpoints, a TargetSpec,
a provider, durations. Secrets are read here and handed on in memory, never written anywhere."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..errors import UsageError
from ..iamauth import IamAuth
from ..providers import Provider, StaticProvider, TargetSpec
from ..urls import Endpoint
from .kube import Kube

_GO_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str | None, default: float) -> float:
    """'1m30s', '100ms', '2h' -> seconds (the CRD validates the format; this only converts)."""
    if not text:
        return default
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UsageError(f"not a duration: {text!r} (use e.g. 100ms, 30s, 1m30s)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def migration_id(obj: dict[str, Any]) -> str:
    """Tags the target as this migration's own (adoption after a restart, safe deletion)."""
    return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"


def endpoint_dict(ep: Endpoint, server_name: str | None = None) -> dict[str, Any]:
    """An endpoint as stored in status (no credentials)."""
    out: dict[str, Any] = {"host": ep.host, "port": ep.port, "tls": ep.tls}
    if server_name:
        out["serverName"] = server_name
    return out


def static_endpoint(side: dict[str, Any]) -> Endpoint:
    first = side["endpoints"][0]
    tls = bool((side.get("tls") or {}).get("enabled"))
    return Endpoint(host=first["host"], port=int(first["port"]), tls=tls)


def credentials(kube: Kube, namespace: str, side: dict[str, Any]) -> tuple[str | None, str | None]:
    """(username, password) from the side's authSecretRef, or (None, None)."""
    ref = side.get("authSecretRef")
    if not ref:
        return None, None
    password = kube.secret_value(namespace, ref["name"], ref.get("key", "token"))
    username = kube.secret_value(namespace, ref["name"], ref["usernameKey"]) if ref.get("usernameKey") else None
    return username, password


def target_spec(obj: dict[str, Any], auth_token: str | None = None) -> TargetSpec:
    target = obj["spec"]["target"]
    overrides = target.get("overrides") or {}
    sgs = overrides.get("securityGroupIds")
    return TargetSpec(
        replication_group_id=target.get("replicationGroupId") or obj["metadata"]["name"],
        migration_id=migration_id(obj),
        durability=target["durability"],
        node_type=target.get("nodeType"),
        engine_version=target.get("engineVersion") or "9.0",
        shards=target.get("shards"),
        replicas_per_shard=target.get("replicasPerShard"),
        subnet_group=overrides.get("subnetGroup"),
        security_group_ids=tuple(sgs) if sgs else None,
        kms_key_id=overrides.get("kmsKeyId"),
        maintenance_window=overrides.get("maintenanceWindow"),
        tags=dict(overrides.get("tags") or {}),
        auth_token=auth_token,
        description=f"DurableCache {migration_id(obj)}",
    )


def make_provider(obj: dict[str, Any], ready_timeout: float) -> Provider:
    """aws: the ElastiCache API (region, credentials and endpoint from the standard AWS chain, e.g. IRSA);
    static: the endpoints in the spec."""
    spec = obj["spec"]
    source = spec["source"]
    if spec["target"].get("provider", "aws") == "aws":
        from ..providers.aws import AwsProvider  # boto3 only when an aws migration exists

        if not source.get("replicationGroupId"):
            raise UsageError("target.provider aws needs source.replicationGroupId (static source endpoints "
                             "cannot be described by the ElastiCache API)")
        return AwsProvider(source["replicationGroupId"], ready_timeout=ready_timeout, first_delay=2.0,
                           max_delay=30.0)
    if not source.get("endpoints"):
        raise UsageError("target.provider static needs source.endpoints")
    targets = [dataclasses.replace(static_endpoint({**spec["target"], "endpoints": [e]}))
               for e in spec["target"]["endpoints"]]
    return StaticProvider(static_endpoint(source), targets, source_name=_source_name(obj))


def side_name(side: dict[str, Any]) -> str:
    """A short description of one side for SOURCE/TARGET in `kubectl get`: the replication group ID, or
    the first endpoint's HOST:PORT with "+N" for N more endpoints."""
    if side.get("replicationGroupId"):
        return str(side["replicationGroupId"])
    endpoints = side.get("endpoints") or []
    if not endpoints:
        return ""
    first = endpoints[0]
    more = f" +{len(endpoints) - 1}" if len(endpoints) > 1 else ""
    return f"{first['host']}:{first['port']}{more}"


def side_names(obj: dict[str, Any]) -> dict[str, str]:
    """status.sourceName and status.targetName. The aws provider names the target after the resource
    when spec.target.replicationGroupId is unset (target_spec)."""
    spec = obj["spec"]
    target = spec["target"]
    if target.get("provider", "aws") == "aws":
        target_name = target.get("replicationGroupId") or obj["metadata"]["name"]
    else:
        target_name = side_name(target)
    return {"sourceName": side_name(spec["source"]), "targetName": str(target_name)}


def _source_name(obj: dict[str, Any]) -> str:
    source = obj["spec"]["source"]
    if source.get("replicationGroupId"):
        return str(source["replicationGroupId"])
    first = source["endpoints"][0]
    return f"{first['host']}:{first['port']}"


def with_credentials(ep: dict[str, Any], username: str | None, password: str | None,
                     ca_file: str | None = None, iam: IamAuth | None = None) -> Endpoint:
    """The stored endpoint plus the credentials read from the Secret, or IAM (worker side)."""
    return Endpoint(host=ep["host"], port=int(ep["port"]), tls=bool(ep.get("tls")), username=username,
                    password=password, ca_file=ca_file, iam=iam)


# -- IAM authentication (aws helper's hunk: spec.<side>.auth.iam -> iamauth.IamAuth) -----------------
def iam_auth(obj: dict[str, Any], side: str) -> IamAuth | None:
    """spec.source.auth.iam / spec.target.auth.iam; the cache defaults to the side's replication group
    (for an aws target, the one the provider creates)."""
    spec_side = obj["spec"][side]
    iam = (spec_side.get("auth") or {}).get("iam")
    if not iam:
        return None
    cache = iam.get("cacheName") or spec_side.get("replicationGroupId")
    if not cache and side == "target" and spec_side.get("provider", "aws") == "aws":
        cache = obj["metadata"]["name"]
    if not cache:
        raise UsageError(f"{side}.auth.iam needs cacheName (no {side}.replicationGroupId to default to)")
    return IamAuth(user=iam["userId"], cache=str(cache), region=iam.get("region"),
                   serverless=bool(iam.get("serverless")))


def ignored_settings(obj: dict[str, Any]) -> list[str]:
    """Spec settings the CRD accepts that the operator does not act on yet (docs/limits.md), each as
    the message of the Warning event that says so: the user learns it at Preflight, not at the end."""
    spec = obj["spec"]
    out = []
    if (spec.get("seeding") or {}).get("mode", "none") != "none":
        out.append("spec.seeding.mode snapshot is not acted on yet: the target is filled by copying every "
                   "key (docs/limits.md)")
    return out
