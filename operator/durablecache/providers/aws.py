"""The ``aws`` provider: the durable target as an ElastiCache replication group, via boto3.

Credentials and region come from the standard chain (environment, IRSA / EKS Pod Identity, instance
profile); deploy/iam-policy.json lists every permission these calls need, and
tests/aws/test_iam_policy.py keeps the two in step.

Test seam: ``endpoint_url`` points the client at moto in server mode, and ``endpoint_resolver``
maps the endpoints the API reports (moto invents hostnames) to servers a test really runs. In
production the resolver is the identity. An operator started by a test gets its resolver from
``DURABLECACHE_TEST_ENDPOINT_MAP`` (``<replication-group-id>=<host>:<port>,...``; resolver_from_env).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, NoRegionError

from .. import logs
from ..errors import ConnectError, RefusedError, UsageError
from ..urls import Endpoint
from . import awserrors, rules
from .awserrors import AwsError, AwsNotFound
from .awslag import DurabilityLagReader
from .base import (
    DURABILITIES,
    OWNER_TAG,
    SOURCE_POLICIES,
    TARGET_POLICIES,
    DeletionOutcome,
    PlannedTarget,
    PreflightResult,
    Provider,
    SourceDescription,
    TargetInfo,
    TargetSpec,
)

EndpointResolver = Callable[[Endpoint], Endpoint]
Clock = Callable[[], float]
Sleep = Callable[[float], None]

# Creating a multi-shard cluster takes 10-20 minutes; seeding from a snapshot adds the restore.
READY_TIMEOUT = 3600.0
SNAPSHOT_TIMEOUT = 3600.0
FIRST_DELAY = 5.0
MAX_DELAY = 60.0
FAILED_STATES = {"create-failed", "deleting", "deleted", "failed"}
ALREADY_EXISTS = ("ReplicationGroupAlreadyExists", "ReplicationGroupAlreadyExistsFault")
SNAPSHOT_EXISTS = ("SnapshotAlreadyExistsFault", "SnapshotAlreadyExists")
ALREADY_DELETING = ("InvalidReplicationGroupState", "InvalidReplicationGroupStateFault")

log = logs.get("durablecache.providers.aws")


# Throttling is retried here, by botocore: adaptive mode adds client-side rate limiting to the
# exponential backoff, so a burst of reconciles slows down instead of failing.
CLIENT_CONFIG = Config(retries={"mode": "adaptive", "max_attempts": 10}, user_agent_extra="durablecache")
# The durability-lag reading is advice, read again in 30 s: short timeouts and few retries, so that an
# unreachable CloudWatch (a VPC without an endpoint for it) costs a warning, not a stuck worker thread.
CLOUDWATCH_CONFIG = Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5, read_timeout=10,
                           user_agent_extra="durablecache")


def make_client(region: str | None = None, endpoint_url: str | None = None,
                session: boto3.session.Session | None = None) -> Any:
    """An ElastiCache client; credentials from ``session`` or else the standard chain."""
    try:
        return (session or boto3.session.Session()).client(
            "elasticache", region_name=region, endpoint_url=endpoint_url, config=CLIENT_CONFIG)
    except NoRegionError:
        raise UsageError("no AWS region: pass --region or set AWS_REGION") from None
    except (BotoCoreError, ValueError) as exc:
        raise ConnectError(f"cannot set up the ElastiCache client: {exc}") from None


def require_durability_api(client: Any) -> None:
    """Fail early, not after a cluster was created without durability: a botocore that does not know
    ``Durability`` would refuse the parameter (or, patched around, drop it)."""
    model = client.meta.service_model
    create = model.operation_model("CreateReplicationGroup").input_shape.members
    described = model.shape_for("ReplicationGroup").members
    if "Durability" not in create or "EffectiveDurability" not in described:
        import botocore

        raise UsageError(f"botocore {botocore.__version__} does not know ElastiCache Durability; "
                         "install boto3/botocore >= 1.43.20")


class AwsProvider(Provider):
    def __init__(
        self,
        source_replication_group_id: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        client: Any = None,
        endpoint_resolver: EndpointResolver | None = None,
        ca_file: str | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        ready_timeout: float = READY_TIMEOUT,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
        cloudwatch: Any = None,
    ):
        self.source_id = source_replication_group_id
        self.client = client if client is not None else make_client(region, endpoint_url)
        self._cloudwatch = cloudwatch
        self._region, self._endpoint_url = region, endpoint_url
        require_durability_api(self.client)
        self.resolve = endpoint_resolver or resolver_from_env() or (lambda ep: ep)
        self.ca_file = ca_file
        self.clock = clock
        self.sleep = sleep
        self.ready_timeout = ready_timeout
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._secrets: tuple[str, ...] = ()

    # -- plumbing -------------------------------------------------------------------------------

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        return awserrors.call(self.client, operation, self._secrets, **params)

    def _remember_secret(self, spec: TargetSpec) -> None:
        if spec.auth_token and spec.auth_token not in self._secrets:
            self._secrets += (spec.auth_token,)

    def _find_rg(self, rg_id: str) -> dict[str, Any] | None:
        try:
            groups = self._call("DescribeReplicationGroups", ReplicationGroupId=rg_id)["ReplicationGroups"]
        except AwsNotFound:
            return None
        return groups[0] if groups else None

    def _tags(self, arn: str | None) -> dict[str, str]:
        if not arn:
            return {}
        return rules.tags_dict(self._call("ListTagsForResource", ResourceName=arn).get("TagList", []))

    def _backoff(self, what: str, deadline: float, delay: float) -> float:
        """Sleep before the next poll; raise when the deadline has passed. Returns the next delay."""
        remaining = deadline - self.clock()
        if remaining <= 0:
            raise RefusedError(f"timed out waiting for {what}")
        self.sleep(min(delay, remaining))
        return min(delay * 2, self.max_delay)

    # -- source ---------------------------------------------------------------------------------

    def describe_source(self) -> SourceDescription:
        rg = self._find_rg(self.source_id)
        if rg is None:
            raise AwsNotFound(f"source replication group {self.source_id!r} not found (check the id and "
                              "the region; a Serverless cache is not a replication group)",
                              code="ReplicationGroupNotFoundFault", operation="DescribeReplicationGroups")
        node = self._member_cluster(rg)
        shards = len(rg.get("NodeGroups") or []) or None
        members = rg.get("MemberClusters") or []
        replicas = None
        if shards:
            per_group = [len(g.get("NodeGroupMembers") or []) for g in rg["NodeGroups"]]
            nodes = max(per_group) if any(per_group) else len(members) // shards
            replicas = max(0, nodes - 1)
        cluster_mode = bool(rg.get("ClusterEnabled")) or rg.get("ClusterMode") == "enabled"
        return SourceDescription(
            replication_group_id=self.source_id,
            engine=rg.get("Engine") or node.get("Engine"),
            engine_version=node.get("EngineVersion"),
            cluster_mode_enabled=cluster_mode,
            shards=shards,
            replicas_per_shard=replicas,
            node_type=rg.get("CacheNodeType") or node.get("CacheNodeType"),
            transit_encryption=bool(rg.get("TransitEncryptionEnabled")),
            at_rest_encryption=bool(rg.get("AtRestEncryptionEnabled")),
            auth_token_enabled=bool(rg.get("AuthTokenEnabled")),
            user_group_ids=tuple(rg.get("UserGroupIds") or ()),
            parameter_group=(node.get("CacheParameterGroup") or {}).get("CacheParameterGroupName"),
            subnet_group=node.get("CacheSubnetGroupName"),
            security_group_ids=tuple(g["SecurityGroupId"] for g in node.get("SecurityGroups") or []
                                     if g.get("SecurityGroupId")),
            kms_key_id=rg.get("KmsKeyId"),
            maintenance_window=node.get("PreferredMaintenanceWindow"),
            port=_endpoint_port(rg),
            tags=self._tags(rg.get("ARN")),
            status=rg.get("Status"),
            arn=rg.get("ARN"),
            endpoint=self._resolved(self._rg_endpoint(rg, password=None, username=None,
                                                      tls=bool(rg.get("TransitEncryptionEnabled")))),
        )

    def _resolved(self, endpoint: Endpoint | None) -> Endpoint | None:
        return None if endpoint is None else self.resolve(endpoint)

    def _member_cluster(self, rg: Mapping[str, Any]) -> dict[str, Any]:
        """Engine version, subnet group, security groups, parameter group and maintenance window are
        reported per cache cluster, not per replication group: read them from the first member."""
        members = rg.get("MemberClusters") or []
        if not members:
            return {}
        try:
            found = self._call("DescribeCacheClusters", CacheClusterId=members[0])["CacheClusters"]
        except AwsNotFound:
            return {}
        return found[0] if found else {}

    # -- preflight ------------------------------------------------------------------------------

    def plan(self, spec: TargetSpec, source: SourceDescription | None = None) -> PlannedTarget:
        return rules.plan_target(spec, source if source is not None else self.describe_source())

    def preflight(self, spec: TargetSpec) -> PreflightResult:
        source = self.describe_source()
        return rules.check(self.plan(spec, source), source)

    # -- target ---------------------------------------------------------------------------------

    def ensure_target(self, spec: TargetSpec) -> TargetInfo:
        self._remember_secret(spec)
        source = self.describe_source()
        plan = self.plan(spec, source)
        result = rules.check(plan, source)
        if not result.ok:
            raise RefusedError(result.message())
        for warning in result.warnings:
            log.warning("preflight warning", field=warning.field, detail=warning.message,
                        suggestion=warning.suggestion)
        existing = self._find_rg(plan.replication_group_id)
        if existing is not None:
            return self._adopt(existing, plan)
        log.info("creating durable target", replication_group_id=plan.replication_group_id,
                 durability=plan.durability, node_type=plan.node_type, shards=plan.shards,
                 replicas_per_shard=plan.replicas_per_shard, seed_snapshot=plan.seed_snapshot)
        try:
            rg = self._call("CreateReplicationGroup", **create_params(plan))["ReplicationGroup"]
        except AwsError as exc:
            if exc.code not in ALREADY_EXISTS:
                raise
            # Another reconcile created it between our describe and our create: adopt, never create twice.
            existing = self._find_rg(plan.replication_group_id)
            if existing is None:
                raise
            return self._adopt(existing, plan)
        return _info(rg, created=True)

    def _adopt(self, rg: dict[str, Any], plan: PlannedTarget) -> TargetInfo:
        rg_id = plan.replication_group_id
        owner = self._tags(rg.get("ARN")).get(OWNER_TAG)
        if owner != plan.migration_id:
            whose = f"migration {owner!r}" if owner else "no DurableCache migration (no owner tag)"
            raise RefusedError(
                f"replication group {rg_id!r} already exists and belongs to {whose}, not to migration "
                f"{plan.migration_id!r}; choose another target.replicationGroupId or delete that cluster")
        status = rg.get("Status")
        if status in FAILED_STATES:
            raise RefusedError(f"target {rg_id!r} is {status}; wait until it is gone, then retry")
        reported = rg.get("Durability")
        if reported is not None and reported not in DURABILITIES:
            raise RefusedError(f"target {rg_id!r} was created with Durability={reported}; durability cannot "
                               "be turned on later: delete it or choose another target.replicationGroupId")
        log.info("adopting existing target", replication_group_id=rg_id, status=status, durability=reported)
        if status == "available" and reported in DURABILITIES and reported != plan.durability:
            self._call("ModifyReplicationGroup", ReplicationGroupId=rg_id, Durability=plan.durability,
                       ApplyImmediately=True)
            rg = self._find_rg(rg_id) or rg
        return _info(rg, created=False)

    def wait_ready(self, spec: TargetSpec, timeout: float | None = None) -> TargetInfo:
        return self._wait_ready(spec, timeout, tolerate_mismatch=False)

    def ready_now(self, spec: TargetSpec) -> TargetInfo | None:
        rg_id = spec.replication_group_id
        rg, status = self._look_at_target(rg_id)
        got = (rg.get("Durability"), rg.get("EffectiveDurability"))
        if status != "available":
            return None
        if got[0] != spec.durability:
            raise RefusedError(_durability_mismatch(rg_id, spec.durability, got))
        return _info(rg) if got == (spec.durability, spec.durability) else None

    def _look_at_target(self, rg_id: str) -> tuple[dict[str, Any], Any]:
        """The target and its status; RefusedError when it is gone or failed."""
        rg = self._find_rg(rg_id)
        if rg is None:
            raise RefusedError(f"target {rg_id!r} disappeared while waiting for it")
        status = rg.get("Status")
        if status in FAILED_STATES:
            raise RefusedError(f"target {rg_id!r} is {status} instead of becoming available")
        return rg, status

    def _wait_ready(self, spec: TargetSpec, timeout: float | None, tolerate_mismatch: bool) -> TargetInfo:
        """Poll with exponential backoff (bounded by ``timeout``) until available, then check that
        the cluster really is durable the way it was asked (Durability and EffectiveDurability)."""
        rg_id = spec.replication_group_id
        deadline = self.clock() + (self.ready_timeout if timeout is None else timeout)
        delay = self.first_delay
        while True:
            rg, status = self._look_at_target(rg_id)
            if status == "available":
                asked = spec.durability
                got = (rg.get("Durability"), rg.get("EffectiveDurability"))
                if got == (asked, asked):
                    log.info("target ready", replication_group_id=rg_id, durability=asked)
                    return _info(rg)
                # Configured as asked but not yet effective: a change still settling, keep polling
                # (bounded). Configured differently: this is not the cluster that was asked for.
                if got[0] != asked and not tolerate_mismatch:
                    raise RefusedError(_durability_mismatch(rg_id, asked, got))
            log.info("waiting for target", replication_group_id=rg_id, status=status, next_poll_s=delay)
            try:
                delay = self._backoff(f"target {rg_id!r} to become available", deadline, delay)
            except RefusedError:
                if status == "available":
                    raise RefusedError(_durability_mismatch(rg_id, spec.durability, got)) from None
                raise RefusedError(f"target {rg_id!r} is still {status} after "
                                   f"{self.ready_timeout if timeout is None else timeout:.0f}s") from None

    def endpoints(self, spec: TargetSpec, username: str | None = None) -> list[Endpoint]:
        """The configuration endpoint, TLS on, with the AUTH token from the spec's secret."""
        self._remember_secret(spec)
        rg = self._find_rg(spec.replication_group_id)
        if rg is None:
            raise AwsNotFound(f"target {spec.replication_group_id!r} not found",
                              code="ReplicationGroupNotFoundFault", operation="DescribeReplicationGroups")
        endpoint = self._rg_endpoint(rg, password=spec.auth_token, username=username, tls=True)
        if endpoint is None:
            raise RefusedError(f"target {spec.replication_group_id!r} reports no endpoint yet "
                               f"(status {rg.get('Status')}); wait until it is available")
        return [self.resolve(endpoint)]

    def _rg_endpoint(self, rg: Mapping[str, Any], password: str | None, username: str | None,
                     tls: bool) -> Endpoint | None:
        address = rg.get("ConfigurationEndpoint") or {}
        if not address.get("Address"):
            groups = rg.get("NodeGroups") or []
            address = (groups[0].get("PrimaryEndpoint") or {}) if groups else {}
        if not address.get("Address"):
            return None
        return Endpoint(host=address["Address"], port=int(address.get("Port") or 6379), username=username,
                        password=password, tls=tls, ca_file=self.ca_file if tls else None)

    def set_durability(self, spec: TargetSpec) -> TargetInfo:
        """sync <-> async through ModifyReplicationGroup; on/off is fixed at creation."""
        if spec.durability not in DURABILITIES:
            raise UsageError(f"durability must be sync or async, not {spec.durability!r}")
        rg_id = spec.replication_group_id
        rg = self._find_rg(rg_id)
        if rg is None:
            raise AwsNotFound(f"target {rg_id!r} not found", code="ReplicationGroupNotFoundFault",
                              operation="DescribeReplicationGroups")
        self._require_owner(rg, spec.migration_id)
        current = rg.get("Durability")
        if current not in DURABILITIES:
            raise RefusedError(f"target {rg_id!r} has Durability={current}; it can only switch between sync "
                               "and async when it was created durable")
        if current != spec.durability:
            log.info("switching durability", replication_group_id=rg_id, old=current, new=spec.durability)
            self._call("ModifyReplicationGroup", ReplicationGroupId=rg_id, Durability=spec.durability,
                       ApplyImmediately=True)
        return self._wait_ready(spec, None, tolerate_mismatch=True)

    def durability_lag_reader(self, spec: TargetSpec) -> DurabilityLagReader:
        """A reader of the target's DurabilityLag (CloudWatch) for the engine's laggovernor; an async
        target refuses writes as it approaches 10 s."""
        rg_id = spec.replication_group_id

        def members() -> list[str]:
            rg = self._find_rg(rg_id)
            return list((rg or {}).get("MemberClusters") or [])

        return DurabilityLagReader(self._cloudwatch_client(), members)

    def _cloudwatch_client(self) -> Any:
        if self._cloudwatch is None:
            try:
                self._cloudwatch = boto3.session.Session().client(
                    "cloudwatch", region_name=self._region or self.client.meta.region_name,
                    endpoint_url=self._endpoint_url, config=CLOUDWATCH_CONFIG)
            except (BotoCoreError, ValueError) as exc:
                raise ConnectError(f"cannot set up the CloudWatch client: {exc}") from None
        return self._cloudwatch

    def _require_owner(self, rg: Mapping[str, Any], migration_id: str) -> None:
        owner = self._tags(rg.get("ARN")).get(OWNER_TAG)
        if owner != migration_id:
            raise RefusedError(f"replication group {rg.get('ReplicationGroupId')!r} is not owned by migration "
                               f"{migration_id!r} (owner tag: {owner!r}); refusing to change it")

    # -- snapshots (seeding) --------------------------------------------------------------------

    def snapshot_source(self, name: str, migration_id: str, timeout: float | None = None, *,
                        route_in_active: bool = False) -> str:
        """Snapshot the source for seeding; reuses this migration's snapshot after a restart.

        RouteIn must already be in place: every write after the snapshot's point in time has to be
        marked dirty by the proxy, or the seeded target silently misses it.
        """
        if not route_in_active:
            raise RefusedError("refusing to snapshot the source for seeding before RouteIn: writes made after "
                               "the snapshot would not be marked dirty and would be lost on the target")
        return self._snapshot(name, migration_id, timeout)

    def _snapshot(self, name: str, migration_id: str, timeout: float | None) -> str:
        snap = self._find_snapshot(name)
        if snap is None:
            log.info("snapshotting source", replication_group_id=self.source_id, snapshot=name)
            try:
                snap = self._call("CreateSnapshot", ReplicationGroupId=self.source_id, SnapshotName=name,
                                  Tags=[{"Key": OWNER_TAG, "Value": migration_id}])["Snapshot"]
            except AwsError as exc:
                if exc.code not in SNAPSHOT_EXISTS:
                    raise
                snap = self._find_snapshot(name)
                if snap is None:
                    raise
        if snap.get("ReplicationGroupId") not in (None, self.source_id):
            raise RefusedError(f"snapshot {name!r} exists but was taken of {snap.get('ReplicationGroupId')!r}, "
                               f"not of the source {self.source_id!r}; choose another snapshot name")
        deadline = self.clock() + (SNAPSHOT_TIMEOUT if timeout is None else timeout)
        delay = self.first_delay
        while snap.get("SnapshotStatus") != "available":
            if snap.get("SnapshotStatus") in ("failed", "deleting"):
                raise RefusedError(f"snapshot {name!r} is {snap.get('SnapshotStatus')}")
            delay = self._backoff(f"snapshot {name!r}", deadline, delay)
            snap = self._find_snapshot(name) or {"SnapshotStatus": "deleting"}
        return name

    def _find_snapshot(self, name: str) -> dict[str, Any] | None:
        try:
            found = self._call("DescribeSnapshots", SnapshotName=name)["Snapshots"]
        except AwsNotFound:
            return None
        return found[0] if found else None

    # -- deletion policies ----------------------------------------------------------------------

    def delete_source(self, policy: str, migration_id: str, migration_completed: bool) -> DeletionOutcome:
        if policy not in SOURCE_POLICIES:
            raise UsageError(f"source deletion policy must be one of {', '.join(SOURCE_POLICIES)}, not {policy!r}")
        rid = self.source_id
        if policy == "Retain":
            return DeletionOutcome(rid, "retained", "deletion policy Retain")
        if not migration_completed:
            # Before completion the source is (or may be) the only complete copy: never delete it.
            log.warning("keeping the source: the migration did not complete", replication_group_id=rid)
            return DeletionOutcome(rid, "retained", "the migration did not complete; the source keeps the data")
        snapshot = None
        if policy == "SnapshotThenDelete":
            snapshot = self._snapshot(final_snapshot_name(rid, migration_id), migration_id, None)
        self._delete_rg(rid)
        return DeletionOutcome(rid, "snapshotted-and-deleted" if snapshot else "deleted",
                               f"deletion policy {policy}", snapshot)

    def delete_target(self, spec: TargetSpec, policy: str, reached_flip: bool) -> DeletionOutcome:
        if policy not in TARGET_POLICIES:
            raise UsageError(f"target deletion policy must be one of {', '.join(TARGET_POLICIES)}, not {policy!r}")
        rid = spec.replication_group_id
        if policy == "Retain":
            return DeletionOutcome(rid, "retained", "deletion policy Retain")
        if reached_flip:
            log.warning("keeping the target: the migration reached FLIP", replication_group_id=rid)
            return DeletionOutcome(rid, "retained", "the migration reached FLIP: the target holds writes the "
                                   "source may not have")
        rg = self._find_rg(rid)
        if rg is None:
            return DeletionOutcome(rid, "deleted", "already gone")
        self._require_owner(rg, spec.migration_id)
        self._delete_rg(rid)
        return DeletionOutcome(rid, "deleted", "deletion policy Delete")

    def _delete_rg(self, rg_id: str) -> None:
        log.info("deleting replication group", replication_group_id=rg_id)
        try:
            self._call("DeleteReplicationGroup", ReplicationGroupId=rg_id)
        except AwsError as exc:
            # Already gone or already being deleted: the outcome we want (idempotent on retry).
            if not isinstance(exc, AwsNotFound) and exc.code not in ALREADY_DELETING:
                raise


TEST_ENDPOINT_MAP = "DURABLECACHE_TEST_ENDPOINT_MAP"


def resolver_from_env(text: str | None = None) -> EndpointResolver | None:
    """The test seam for a whole operator (tests/kube): ``DURABLECACHE_TEST_ENDPOINT_MAP`` maps the
    endpoints the API reports for a replication group (any host with the group's id as one of its DNS
    labels, as ElastiCache's and moto's hostnames have) to a server the test runs. Unset in production."""
    text = os.environ.get(TEST_ENDPOINT_MAP) if text is None else text
    if not text:
        return None
    mapping: dict[str, tuple[str, int]] = {}
    for item in text.split(","):
        rg_id, _, address = item.strip().partition("=")
        host, _, port = address.rpartition(":")
        if not rg_id or not host or not port.isdigit():
            raise UsageError(f"{TEST_ENDPOINT_MAP}: expected <replication-group-id>=<host>:<port>, not {item!r}")
        mapping[rg_id] = (host, int(port))
    log.warning("endpoints mapped by the test seam", variable=TEST_ENDPOINT_MAP, groups=sorted(mapping))

    def resolve(endpoint: Endpoint) -> Endpoint:
        for label in endpoint.host.split("."):
            if label in mapping:
                return endpoint.with_address(*mapping[label])
        return endpoint

    return resolve


def create_params(plan: PlannedTarget) -> dict[str, Any]:
    """CreateReplicationGroup parameters: always an explicit Durability, never ``default``."""
    if plan.durability not in DURABILITIES:
        # Defence in depth: rules.check refuses this first, but "default" must never reach AWS.
        raise UsageError(f"durability must be sync or async, not {plan.durability!r}")
    params: dict[str, Any] = {
        "ReplicationGroupId": plan.replication_group_id,
        "ReplicationGroupDescription": plan.description,
        "Engine": plan.engine,
        "EngineVersion": plan.engine_version,
        "CacheNodeType": plan.node_type,
        "ClusterMode": "enabled",
        "NumNodeGroups": plan.shards,
        "ReplicasPerNodeGroup": plan.replicas_per_shard,
        "MultiAZEnabled": True,
        "AutomaticFailoverEnabled": True,
        "TransitEncryptionEnabled": True,
        "AtRestEncryptionEnabled": True,
        "Durability": plan.durability,
        "Tags": [{"Key": k, "Value": v} for k, v in sorted(plan.tags.items())],
    }
    optional = {
        "CacheSubnetGroupName": plan.subnet_group,
        "SecurityGroupIds": list(plan.security_group_ids) or None,
        "UserGroupIds": list(plan.user_group_ids) or None,
        "AuthToken": plan.auth_token,
        "KmsKeyId": plan.kms_key_id,
        "PreferredMaintenanceWindow": plan.maintenance_window,
        "CacheParameterGroupName": plan.parameter_group,
        "Port": plan.port,
        "SnapshotName": plan.seed_snapshot,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def final_snapshot_name(source_id: str, migration_id: str) -> str:
    """A snapshot name that is valid for ElastiCache and stable across retries."""
    slug = re.sub(r"[^a-zA-Z0-9-]+", "-", migration_id).strip("-")
    name = re.sub(r"-{2,}", "-", f"{source_id}-final-{slug}")
    return name[:255].rstrip("-")


def _endpoint_port(rg: Mapping[str, Any]) -> int | None:
    cfg = rg.get("ConfigurationEndpoint") or {}
    if cfg.get("Port"):
        return int(cfg["Port"])
    groups = rg.get("NodeGroups") or []
    port = (groups[0].get("PrimaryEndpoint") or {}).get("Port") if groups else None
    return int(port) if port else None


def _info(rg: Mapping[str, Any], created: bool = False) -> TargetInfo:
    cfg = rg.get("ConfigurationEndpoint") or {}
    endpoint = (Endpoint(host=cfg["Address"], port=int(cfg.get("Port") or 6379), tls=True)
                if cfg.get("Address") else None)
    return TargetInfo(
        replication_group_id=rg["ReplicationGroupId"],
        status=str(rg.get("Status")),
        durability=rg.get("Durability"),
        effective_durability=rg.get("EffectiveDurability"),
        endpoint=endpoint,
        arn=rg.get("ARN"),
        created=created,
    )


def _durability_mismatch(rg_id: str, asked: str, got: tuple[Any, Any]) -> str:
    if got == (None, None):
        return (f"target {rg_id!r} is available but the API reported no Durability/EffectiveDurability, so "
                "we cannot confirm it is durable (botocore >= 1.43.20 is needed to read them)")
    return (f"target {rg_id!r} reports Durability={got[0]}, EffectiveDurability={got[1]}, but {asked} was asked; "
            "it is not the durable cluster requested")
