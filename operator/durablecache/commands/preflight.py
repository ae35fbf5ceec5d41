"""``durablecache preflight``: can a durable target be created from this source? Changes nothing.

Exit codes: 0 a durable target can be created as asked, 1 it cannot (every violation is printed with
its fix), 2 an error (source not found, no credentials, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..errors import UsageError
from ..providers import rules
from ..providers.base import Advice, PlannedTarget, PreflightResult, SourceDescription, TargetSpec

NAME = "preflight"
HELP = "check that a durable ElastiCache target can be created from a source replication group"

# Violations name spec fields; on the command line the same thing is a flag.
FLAGS = {
    "target.nodeType": "--node-type",
    "target.engineVersion": "--engine-version",
    "target.shards": "--shards",
    "target.replicasPerShard": "--replicas",
    "target.durability": "--durability",
    "target.replicationGroupId": "--target-replication-group",
    "target.authSecretRef": "--auth-token-env",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source-replication-group", required=True, metavar="ID",
                        help="the existing (non-durable) replication group")
    parser.add_argument("--durability", required=True, choices=["sync", "async"],
                        help="the durability the target is to be created with (see docs/durability.md)")
    parser.add_argument("--target-replication-group", metavar="ID",
                        help="id for the durable target (default: SOURCE-durable)")
    parser.add_argument("--node-type", help="target node type (default: the source's)")
    parser.add_argument("--engine-version", default="9.0", help="target Valkey version (default: 9.0)")
    parser.add_argument("--shards", type=int, help="target shards (default: the source's)")
    parser.add_argument("--replicas", type=int, help="target replicas per shard (default: the source's, at least 1)")
    parser.add_argument("--write-rate", type=float, metavar="MIB_S",
                        help="observed or estimated source write rate in MiB/s (warns above 100 MiB/s per shard)")
    parser.add_argument("--auth-token-env", metavar="VAR",
                        help="name of an environment variable holding the target AUTH token (checked, never printed)")
    parser.add_argument("--region", help="AWS region (default: the standard chain, e.g. AWS_REGION)")
    parser.add_argument("--endpoint-url", help="ElastiCache API endpoint (e.g. a moto server for tests)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from ..providers.aws import AwsProvider  # boto3 is only imported by commands that need it

    token = None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env)
        if token is None:
            raise UsageError(f"environment variable {args.auth_token_env} is not set")
    provider = AwsProvider(args.source_replication_group, region=args.region, endpoint_url=args.endpoint_url)
    source = provider.describe_source()
    spec = TargetSpec(
        replication_group_id=args.target_replication_group or default_target_id(args.source_replication_group),
        migration_id="preflight",
        durability=args.durability,
        node_type=args.node_type,
        engine_version=args.engine_version,
        shards=args.shards,
        replicas_per_shard=args.replicas,
        auth_token=token,
        write_rate_mib_s=args.write_rate,
    )
    plan = provider.plan(spec, source)
    result = rules.check(plan, source)
    if token is None:
        result = _auth_later(result)
    if args.json:
        print(json.dumps(to_json(source, plan, result), indent=2, sort_keys=True))
    else:
        print_human(source, plan, result)
    return 0 if result.ok else 1


def default_target_id(source_id: str) -> str:
    return f"{source_id[:32]}-durable"


def _auth_later(result: PreflightResult) -> PreflightResult:
    """Without a token on the command line, "the target needs AUTH" is a reminder, not a refusal: the
    manifest will carry the token secret."""
    keep, moved = [], []
    for v in result.violations:
        if v.field == "target.authSecretRef" and v.problem == rules.MISSING_AUTH:
            moved.append(Advice(v.field, "the source requires authentication", v.fix))
        else:
            keep.append(v)
    return PreflightResult(tuple(keep), result.warnings + tuple(moved))


def print_human(source: SourceDescription, plan: PlannedTarget, result: PreflightResult) -> None:
    out = sys.stdout
    print(f"source: {source.summary()}", file=out)
    print(f"target: {plan.summary()}", file=out)
    for v in result.violations:
        flag = f" [{FLAGS[v.field]}]" if v.field in FLAGS else ""
        print(f"VIOLATION {v.field}{flag}: {v.problem}\n  fix: {v.fix}", file=out)
    for w in result.warnings:
        print(f"WARNING {w.field}: {w.message}\n  suggestion: {w.suggestion}", file=out)
    if result.ok:
        print("OK: a durable target can be created as asked", file=out)
    else:
        print(f"NOT OK: {len(result.violations)} violation(s); a durable target cannot be created as asked",
              file=out)


def to_json(source: SourceDescription, plan: PlannedTarget, result: PreflightResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "source": {
            "replicationGroupId": source.replication_group_id, "engine": source.engine,
            "engineVersion": source.engine_version, "clusterModeEnabled": source.cluster_mode_enabled,
            "shards": source.shards, "replicasPerShard": source.replicas_per_shard, "nodeType": source.node_type,
            "transitEncryption": source.transit_encryption, "authTokenEnabled": source.auth_token_enabled,
        },
        "target": {
            "replicationGroupId": plan.replication_group_id, "engine": plan.engine,
            "engineVersion": plan.engine_version, "nodeType": plan.node_type, "shards": plan.shards,
            "replicasPerShard": plan.replicas_per_shard, "durability": plan.durability,
            "carriedFromSource": sorted(plan.carried),
        },
        "violations": [{"field": v.field, "problem": v.problem, "fix": v.fix} for v in result.violations],
        "warnings": [{"field": w.field, "message": w.message, "suggestion": w.suggestion} for w in result.warnings],
    }
