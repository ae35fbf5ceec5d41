"""moto's server, plus the ElastiCache behaviour DurableCache relies on and moto 5.x does not model.

Run as ``python tests/aws/motoserver.py -H 127.0.0.1 -p PORT`` (the same arguments as moto_server).
The provider still talks to a real HTTP endpoint through botocore; these additions only make the
server answer the way ElastiCache documents it, so the provider's read-back and polling paths run:

1. Durability. CreateReplicationGroup stores the ``Durability`` sent (or, restoring a snapshot without
   an override, the snapshot's); ``default`` resolves to ``disabled`` as on Valkey 9.0. Describe
   reports ``Durability`` and ``EffectiveDurability``. ModifyReplicationGroup switches sync<->async and
   refuses to turn durability on for a group created without it. CreateSnapshot records the group's
   durability. (moto ignores the parameter altogether.)
2. Lifecycle. A new group is ``creating`` (a modified one ``modifying``) for the first
   ``DC_MOTO_POLLS`` DescribeReplicationGroups, then ``available``; a new snapshot is ``creating`` for
   as many DescribeSnapshots; a deleted group is ``deleting`` for one describe, then gone.
   (moto makes everything ``available`` at once and never removes a deleted group.)
3. Seeding. CreateReplicationGroup with a ``SnapshotName`` that does not exist fails with
   SnapshotNotFoundFault (moto accepts any name). A group tagged ``dc-moto/hold-file`` stays
   ``creating`` until that file exists: moto holds no data, so a test restores the snapshot's data into
   the local server the group maps to itself (the stand-in for ElastiCache's restore, tests/kube/
   test_aws_seeding.py) and only then lets the group become ``available``.
4. Quota. A group of more than ``DC_MOTO_NODE_QUOTA`` nodes fails with NodeQuotaForClusterExceeded,
   so the quota error path is exercised end to end (moto has no quotas).
5. Cache clusters report the ``CacheParameterGroup`` and ``SecurityGroups`` they were created with
   (moto stores both but leaves them out of DescribeCacheClusters).

Nothing else is changed: describe, tags, snapshots, errors and IAM enforcement are moto's own.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from moto.elasticache.exceptions import (
    ElastiCacheException,
    InvalidParameterCombinationException,
    SnapshotNotFound,
)
from moto.elasticache.responses import ElastiCacheResponse
from moto.server import main

POLLS = int(os.environ.get("DC_MOTO_POLLS", "1"))
# A test can make one group stay "creating" longer by tagging it (to exercise timeouts).
POLLS_TAG = "dc-moto/polls"
HOLD_TAG = "dc-moto/hold-file"    # see 3. in the docstring
NODE_QUOTA = int(os.environ.get("DC_MOTO_NODE_QUOTA", "90"))


class NodeQuotaForClusterExceeded(ElastiCacheException):
    code = "NodeQuotaForClusterExceeded"


def _effective(durability: str) -> str:
    return "disabled" if durability in ("default", "disabled") else durability


_create = ElastiCacheResponse.create_replication_group


def create_replication_group(self: ElastiCacheResponse) -> Any:
    backend = self.elasticache_backend
    snapshot_name = self._get_param("SnapshotName")
    snapshot = backend.snapshots.get(snapshot_name) if snapshot_name else None
    if snapshot_name and snapshot is None:
        raise SnapshotNotFound(snapshot_name)
    shards = self._get_int_param("NumNodeGroups") or 1
    replicas = self._get_int_param("ReplicasPerNodeGroup") or 0
    if shards * (replicas + 1) > NODE_QUOTA:
        raise NodeQuotaForClusterExceeded(
            f"Cannot create a cluster with {shards * (replicas + 1)} nodes: the limit is {NODE_QUOTA} nodes "
            "per cluster.")
    result = _create(self)
    rg = backend.replication_groups[self._get_param("ReplicationGroupId")]
    asked = self._get_param("Durability") or (getattr(snapshot, "durability", None) if snapshot else None)
    rg.durability = asked or "default"
    rg.effective_durability = _effective(rg.durability)
    rg.status = "creating"
    tags = {t.get("Key"): t.get("Value") for t in self._get_param("Tags", [])}
    rg.dc_polls = int(tags.get(POLLS_TAG) or POLLS)
    rg.dc_hold_file = tags.get(HOLD_TAG)
    return result


_describe = ElastiCacheResponse.describe_replication_groups


def describe_replication_groups(self: ElastiCacheResponse) -> Any:
    groups = self.elasticache_backend.replication_groups
    wanted = self._get_param("ReplicationGroupId")
    for rg_id in [wanted] if wanted else list(groups):
        rg = groups.get(rg_id)
        if rg is None:
            continue
        polls = getattr(rg, "dc_polls", 0)
        hold = getattr(rg, "dc_hold_file", None)
        if rg.status == "creating" and hold and not os.path.exists(hold):
            continue
        if rg.status in ("creating", "modifying", "deleting") and polls > 0:
            rg.dc_polls = polls - 1
        elif rg.status == "deleting":
            del groups[rg_id]
        elif rg.status in ("creating", "modifying"):
            rg.status = "available"
            if hasattr(rg, "dc_pending_durability"):
                rg.effective_durability = rg.dc_pending_durability
                del rg.dc_pending_durability
    return _describe(self)


_modify = ElastiCacheResponse.modify_replication_group


def modify_replication_group(self: ElastiCacheResponse) -> Any:
    asked = self._get_param("Durability")
    rg = self.elasticache_backend.replication_groups.get(self._get_param("ReplicationGroupId"))
    if asked and rg is not None:
        if _effective(getattr(rg, "durability", "default")) == "disabled" and asked in ("sync", "async"):
            raise InvalidParameterCombinationException(
                "Durability can only be enabled when a replication group is created.")
        if asked not in ("sync", "async"):
            raise InvalidParameterCombinationException("Durability of a durable group can only be sync or async.")
    result = _modify(self)
    if asked and rg is not None:
        rg.durability = asked
        rg.dc_pending_durability = asked
        rg.status = "modifying"
        rg.dc_polls = POLLS
    return result


_delete = ElastiCacheResponse.delete_replication_group


def delete_replication_group(self: ElastiCacheResponse) -> Any:
    result = _delete(self)
    rg = self.elasticache_backend.replication_groups.get(self._get_param("ReplicationGroupId"))
    if rg is not None:
        rg.dc_polls = 1  # seen "deleting" once, then gone
    return result


_snapshot = ElastiCacheResponse.create_snapshot


def create_snapshot(self: ElastiCacheResponse) -> Any:
    result = _snapshot(self)
    backend = self.elasticache_backend
    snap = backend.snapshots[self._get_param("SnapshotName")]
    rg = backend.replication_groups.get(self._get_param("ReplicationGroupId") or "")
    snap.durability = getattr(rg, "durability", None) if rg is not None else None
    snap.snapshot_status = "creating"
    snap.dc_polls = POLLS
    return result


_describe_snapshots = ElastiCacheResponse.describe_snapshots


def describe_snapshots(self: ElastiCacheResponse) -> Any:
    for snap in self.elasticache_backend.snapshots.values():
        if snap.snapshot_status == "creating":
            if getattr(snap, "dc_polls", 0) > 0:
                snap.dc_polls -= 1
            else:
                snap.snapshot_status = "available"
    return _describe_snapshots(self)


_create_cluster = ElastiCacheResponse.create_cache_cluster


def create_cache_cluster(self: ElastiCacheResponse) -> Any:
    result = _create_cluster(self)
    cluster = self.elasticache_backend.cache_clusters[self._get_param("CacheClusterId")]
    if cluster.cache_parameter_group_name:
        cluster.cache_parameter_group = {"CacheParameterGroupName": cluster.cache_parameter_group_name,
                                         "ParameterApplyStatus": "in-sync"}
    cluster.security_groups = [{"SecurityGroupId": g, "Status": "active"} for g in cluster.security_group_ids]
    return result


ElastiCacheResponse.create_cache_cluster = create_cache_cluster  # type: ignore[method-assign]
ElastiCacheResponse.create_replication_group = create_replication_group  # type: ignore[method-assign]
ElastiCacheResponse.describe_replication_groups = describe_replication_groups  # type: ignore[method-assign]
ElastiCacheResponse.modify_replication_group = modify_replication_group  # type: ignore[method-assign]
ElastiCacheResponse.delete_replication_group = delete_replication_group  # type: ignore[method-assign]
ElastiCacheResponse.create_snapshot = create_snapshot  # type: ignore[method-assign]
ElastiCacheResponse.describe_snapshots = describe_snapshots  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
