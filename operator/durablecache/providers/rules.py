"""The durability rules, as pure functions: no AWS call, no I/O.

``plan_target`` resolves what the user asked for against the source (carrying settings over), and
``check`` lists every reason AWS would refuse to create that target durable — all of them at once,
each with the change that fixes it — plus warnings. AWS would refuse the same things, but only after
minutes of provisioning or with a less helpful message; preflight refuses them first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .base import (
    DURABILITIES,
    OWNER_TAG,
    SOURCE_TAG,
    Advice,
    PlannedTarget,
    PreflightResult,
    SourceDescription,
    TargetSpec,
    Violation,
)

DURABLE_FAMILIES: tuple[str, ...] = ("r7g", "r6g", "m7g", "m6g", "c7gn")
MIN_VALKEY = (9, 0)
# A durable primary accepts at most this many MiB/s of writes.
MAX_WRITE_MIB_PER_SHARD = 100.0
# Keys are rarely spread evenly over shards: warn (and size the suggestion) with 20 % headroom.
WRITE_HEADROOM = 0.8
MAX_SHARDS = 500
SUGGESTED_NODE_TYPE = "cache.r7g.large"
MISSING_AUTH = "the source requires authentication but the target would have none"
R7G_SIZES = ("large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge")

_NODE_TYPE = re.compile(r"^cache\.([a-z0-9]+)\.([a-z0-9]+)$")
_VERSION = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?$")
# ElastiCache: 1-40 characters, letters/digits/hyphens, starts with a letter, no "--", no trailing "-".
_RG_ID = re.compile(r"^[a-zA-Z](?:[a-zA-Z0-9]|-(?!-)){0,39}$")
# Tag values: letters, digits, spaces and + - = . _ : / @, at most 256 characters.
_TAG_VALUE = re.compile(r"^[\w .:/=+\-@]{1,256}$")


def plan_target(spec: TargetSpec, source: SourceDescription | None) -> PlannedTarget:
    """The target as it will be requested: spec values first, then the source's, then defaults."""
    src = source or SourceDescription(replication_group_id="")
    carried: set[str] = set()

    def carry(name: str, asked: object, from_source: object, default: object = None) -> object:
        if asked is not None:
            return asked
        if from_source not in (None, (), ""):
            carried.add(name)
            return from_source
        return default

    # A token in the spec replaces the source's user groups; user groups given in the spec are kept
    # (and refused together with the token by check_auth).
    user_groups = spec.user_group_ids if spec.auth_token else carry(
        "user_group_ids", spec.user_group_ids, src.user_group_ids, ())
    tags = {k: v for k, v in src.tags.items() if not k.startswith(("aws:", "durablecache.dev/"))}
    tags.update(spec.tags)
    tags[OWNER_TAG] = spec.migration_id
    if src.replication_group_id:
        tags[SOURCE_TAG] = src.replication_group_id
    return PlannedTarget(
        replication_group_id=spec.replication_group_id,
        migration_id=spec.migration_id,
        durability=spec.durability,
        engine=spec.engine,
        engine_version=spec.engine_version,
        node_type=carry("node_type", spec.node_type, src.node_type),  # type: ignore[arg-type]
        shards=carry("shards", spec.shards, src.shards, 1),  # type: ignore[arg-type]
        # At least one replica: a durable cluster needs Multi-AZ, even when the source had none.
        replicas_per_shard=(spec.replicas_per_shard if spec.replicas_per_shard is not None
                            else max(1, src.replicas_per_shard or 0)),
        cluster_mode_enabled=spec.cluster_mode_enabled,
        multi_az=spec.multi_az,
        transit_encryption=spec.transit_encryption,
        serverless=spec.serverless,
        subnet_group=carry("subnet_group", spec.subnet_group, src.subnet_group),  # type: ignore[arg-type]
        security_group_ids=tuple(carry("security_group_ids", spec.security_group_ids,  # type: ignore[arg-type]
                                       src.security_group_ids, ())),
        user_group_ids=tuple(user_groups or ()),  # type: ignore[arg-type]
        auth_token=spec.auth_token,
        kms_key_id=carry("kms_key_id", spec.kms_key_id, src.kms_key_id),  # type: ignore[arg-type]
        maintenance_window=carry("maintenance_window", spec.maintenance_window,  # type: ignore[arg-type]
                                 src.maintenance_window),
        # Not carried: a Redis OSS or Valkey 8 parameter group cannot be used with Valkey 9.
        parameter_group=spec.parameter_group,
        port=carry("port", spec.port, src.port),  # type: ignore[arg-type]
        tags=tags,
        seed_snapshot=spec.seed_snapshot,
        description=spec.description or _description(spec, src),
        write_rate_mib_s=spec.write_rate_mib_s,
        carried=frozenset(carried),
    )


def _description(spec: TargetSpec, src: SourceDescription) -> str:
    origin = f" from {src.replication_group_id}" if src.replication_group_id else ""
    return f"DurableCache durable target{origin} (migration {spec.migration_id})"[:255]


def check(plan: PlannedTarget, source: SourceDescription | None = None) -> PreflightResult:
    """Every rule at once: all violations (each with its fix) and all warnings."""
    violations: list[Violation] = []
    for rule in (check_names, check_durability, check_engine, check_node_type, check_cluster_mode,
                 check_availability, check_shards, check_tls, check_serverless, check_auth):
        violations += rule(plan, source)
    warnings = check_write_rate(plan) + check_source_databases(plan, source)
    return PreflightResult(tuple(violations), tuple(warnings))


def check_names(plan: PlannedTarget, source: SourceDescription | None) -> list[Violation]:
    out: list[Violation] = []
    if not _RG_ID.match(plan.replication_group_id) or plan.replication_group_id.endswith("-"):
        out.append(Violation(
            "target.replicationGroupId",
            f"{plan.replication_group_id!r} is not a valid replication group id",
            "use 1-40 letters, digits or hyphens, starting with a letter, without '--' or a trailing '-'"))
    elif source and plan.replication_group_id.lower() == source.replication_group_id.lower():
        out.append(Violation("target.replicationGroupId", "the target has the same id as the source",
                             "choose a new id for the durable target, e.g. "
                             f"{(source.replication_group_id[:32] + '-durable')!r}"))
    if not _TAG_VALUE.match(plan.migration_id or ""):
        out.append(Violation("migration id", f"{plan.migration_id!r} cannot be an AWS tag value",
                             "use 1-256 letters, digits, spaces or + - = . _ : / @"))
    return out


def check_durability(plan: PlannedTarget, _source: SourceDescription | None) -> list[Violation]:
    if plan.durability in DURABILITIES:
        return []
    why = (" ('default' resolves to disabled on Valkey 9.0)" if plan.durability == "default" else "")
    return [Violation("target.durability", f"durability {plan.durability!r} is not sync or async{why}",
                      "set durability to sync (every write on disk before it is acknowledged) or async")]


def check_engine(plan: PlannedTarget, _source: SourceDescription | None) -> list[Violation]:
    out: list[Violation] = []
    if plan.engine != "valkey":
        out.append(Violation("target.engine", f"engine {plan.engine!r} cannot be durable",
                             "use engine valkey (a Redis OSS source is fine: only the target must be Valkey)"))
    version = parse_version(plan.engine_version)
    if version is None:
        out.append(Violation("target.engineVersion", f"{plan.engine_version!r} is not a version number",
                             "use engineVersion 9.0 or later"))
    elif version < MIN_VALKEY:
        out.append(Violation("target.engineVersion",
                             f"Valkey {plan.engine_version} has no durability (it needs 9.0 or later)",
                             "use engineVersion 9.0 or later (the source may stay on its older version)"))
    return out


def check_node_type(plan: PlannedTarget, _source: SourceDescription | None) -> list[Violation]:
    families = ", ".join(DURABLE_FAMILIES)
    if not plan.node_type:
        return [Violation("target.nodeType", "no node type given and the source's is unknown",
                          f"set nodeType, e.g. {SUGGESTED_NODE_TYPE} (families: {families})")]
    match = _NODE_TYPE.match(plan.node_type)
    if match and match.group(1) in DURABLE_FAMILIES:
        return []
    origin = " (carried from the source)" if "node_type" in plan.carried else ""
    return [Violation("target.nodeType",
                      f"{plan.node_type}{origin} is not in a node family that supports durability ({families})",
                      f"set nodeType to {suggest_node_type(plan.node_type)}")]


def check_cluster_mode(plan: PlannedTarget, _source: SourceDescription | None) -> list[Violation]:
    if plan.cluster_mode_enabled:
        return []
    return [Violation("target.clusterMode", "durable clusters must run in cluster mode",
                      "enable cluster mode (one shard is fine; cluster clients can still use it)")]


def check_availability(plan: PlannedTarget, _source: SourceDescription | None) -> list[Violation]:
    out: list[Violation] = []
    if not plan.multi_az:
        out.append(Violation("target.multiAZ", "durable clusters need Multi-AZ with automatic failover",
                             "enable Multi-AZ"))
    if plan.replicas_per_shard < 1:
        out.append(Violation("target.replicasPerShard",
                             f"{plan.replicas_per_shard} replica(s) per shard; Multi-AZ needs at least 1",
                             "set replicasPerShard to 1 or more"))
    elif plan.replicas_per_shard > 5:
        out.append(Violation("target.replicasPerShard",
                             f"{plan.replicas_per_shard} replicas per shard; ElastiCache allows at most 5",
                             "set replicasPerShard between 1 and 5"))
    return out


def check_shards(plan: PlannedTarget, _source: SourceDescription | None) -> list[Violation]:
    if 1 <= plan.shards <= MAX_SHARDS:
        return []
    return [Violation("target.shards", f"{plan.shards} shards is out of range",
                      f"set shards between 1 and {MAX_SHARDS}")]


def check_tls(plan: PlannedTarget, _source: SourceDescription | None) -> list[Violation]:
    if plan.transit_encryption:
        return []
    return [Violation("target.transitEncryption", "durable clusters require TLS in transit",
                      "enable transit encryption (clients must then connect with TLS)")]


def check_serverless(plan: PlannedTarget, _source: SourceDescription | None) -> list[Violation]:
    if not plan.serverless:
        return []
    return [Violation("target.serverless", "ElastiCache Serverless caches cannot be durable",
                      "use a node-based replication group (set nodeType and shards instead)")]


def check_auth(plan: PlannedTarget, source: SourceDescription | None) -> list[Violation]:
    out: list[Violation] = []
    token = plan.auth_token
    if token is not None and not valid_auth_token(token):
        # Never echo the token itself: only what is wrong with it.
        out.append(Violation("target.authSecretRef",
                             f"the AUTH token ({len(token)} characters) is not accepted by ElastiCache",
                             "use 16-128 printable ASCII characters without spaces, '/', '\"' or '@'"))
    if token and plan.user_group_ids:
        out.append(Violation("target.userGroupIds", "both an AUTH token and user groups are given",
                             "use either an AUTH token or RBAC user groups, not both"))
    source_has_auth = bool(source and (source.auth_token_enabled or source.user_group_ids))
    if source_has_auth and not token and not plan.user_group_ids:
        out.append(Violation("target.authSecretRef", MISSING_AUTH,
                             "give the target an AUTH token secret (the source's token works) or user groups"))
    return out


def check_write_rate(plan: PlannedTarget) -> list[Advice]:
    rate = plan.write_rate_mib_s
    if rate is None or rate <= 0 or plan.shards < 1:
        return []
    per_shard = rate / plan.shards
    if per_shard <= MAX_WRITE_MIB_PER_SHARD * WRITE_HEADROOM:
        return []
    return [Advice(
        "target.shards",
        f"the source writes about {rate:.0f} MiB/s: {per_shard:.0f} MiB/s per shard over {plan.shards} "
        f"shard(s), and a durable primary accepts at most {MAX_WRITE_MIB_PER_SHARD:.0f} MiB/s "
        "(uneven keys can push one shard over)",
        f"use at least {suggest_shards(rate)} shards")]


def check_source_databases(plan: PlannedTarget, source: SourceDescription | None) -> list[Advice]:
    if not source or source.cluster_mode_enabled is not False:
        return []
    return [Advice("source", "the source runs with cluster mode disabled; a cluster-mode target has only "
                   "database 0", "make sure applications use database 0 only")]


def suggest_shards(rate_mib_s: float) -> int:
    return max(1, math.ceil(rate_mib_s / (MAX_WRITE_MIB_PER_SHARD * WRITE_HEADROOM)))


def suggest_node_type(node_type: str) -> str:
    """The same size in r7g when r7g has it (cache.m5.xlarge -> cache.r7g.xlarge), else r7g.large."""
    match = _NODE_TYPE.match(node_type or "")
    if match and match.group(2) in R7G_SIZES:
        return f"cache.r7g.{match.group(2)}"
    return SUGGESTED_NODE_TYPE


def parse_version(text: str) -> tuple[int, int] | None:
    match = _VERSION.match((text or "").strip())
    if not match:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def valid_auth_token(token: str) -> bool:
    return (16 <= len(token) <= 128 and all(33 <= ord(c) <= 126 for c in token)
            and not any(c in token for c in '/"@'))


def node_family(node_type: str) -> str | None:
    match = _NODE_TYPE.match(node_type or "")
    return match.group(1) if match else None


def tags_dict(tag_list: list[Mapping[str, str]]) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in tag_list}
