"""Snapshot seeding and the deletion policies, against moto in server mode."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from awstest import FakeClock, Recorder, unique

from durablecache.errors import RefusedError, UsageError
from durablecache.providers.aws import AwsProvider, final_snapshot_name
from durablecache.providers.awserrors import AwsNotFound
from durablecache.providers.base import OWNER_TAG, TargetSpec

MIGRATION = "shop/sessions"


def spec_for(**kw: Any) -> TargetSpec:
    kw.setdefault("replication_group_id", unique("tgt"))
    return TargetSpec(migration_id=MIGRATION, durability="sync", **kw)


def test_snapshot_needs_route_in_first(make_source: Callable[..., str], make_provider: Callable[..., AwsProvider],
                                       recorder: Recorder) -> None:
    src = make_source()
    with pytest.raises(RefusedError, match="before RouteIn"):
        make_provider(src).snapshot_source(unique("seed"), MIGRATION)
    assert "CreateSnapshot" not in recorder.operations()


def test_seed_from_a_fresh_snapshot_with_durability_override(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], recorder: Recorder,
        clock: FakeClock, admin: Any) -> None:
    src = make_source()
    provider = make_provider(src)
    name = unique("seed")
    assert provider.snapshot_source(name, MIGRATION, route_in_active=True) == name
    assert clock.sleeps == [5.0, 10.0]  # created "creating", described "creating" once, then available
    (sent,) = recorder.params("CreateSnapshot")
    assert sent["ReplicationGroupId"] == src and {"Key": OWNER_TAG, "Value": MIGRATION} in sent["Tags"]
    # The source was not durable; the snapshot says so, and the restore overrides it.
    assert admin.describe_snapshots(SnapshotName=name)["Snapshots"][0]["Durability"] == "default"

    # A restarted reconcile reuses the snapshot instead of taking a second one.
    assert make_provider(src).snapshot_source(name, MIGRATION, route_in_active=True) == name
    assert len(recorder.params("CreateSnapshot")) == 1

    spec = spec_for(seed_snapshot=name)
    provider.ensure_target(spec)
    created = recorder.params("CreateReplicationGroup")[0]
    assert (created["SnapshotName"], created["Durability"]) == (name, "sync")
    assert b"Durability=sync" in recorder.body("CreateReplicationGroup")
    assert provider.wait_ready(spec).effective_durability == "sync"


def test_seed_from_a_missing_snapshot_is_one_clear_error(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider]) -> None:
    src = make_source()
    with pytest.raises(AwsNotFound, match="SnapshotNotFoundFault: Snapshot no-such-snap not found"):
        make_provider(src).ensure_target(spec_for(seed_snapshot="no-such-snap"))


def test_a_snapshot_of_another_group_is_not_reused(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], admin: Any) -> None:
    src, other = make_source(), make_source()
    name = unique("seed")
    admin.create_snapshot(ReplicationGroupId=other, SnapshotName=name)
    with pytest.raises(RefusedError, match=f"was taken of '{other}'"):
        make_provider(src).snapshot_source(name, MIGRATION, route_in_active=True)


def test_snapshot_wait_is_bounded(make_source: Callable[..., str], make_provider: Callable[..., AwsProvider],
                                  clock: FakeClock) -> None:
    src = make_source()
    with pytest.raises(RefusedError, match="timed out waiting for snapshot"):
        make_provider(src).snapshot_source(unique("seed"), MIGRATION, timeout=3.0, route_in_active=True)
    assert clock.now == 3.0


def _exists(admin: Any, rg_id: str) -> bool:
    try:
        admin.describe_replication_groups(ReplicationGroupId=rg_id)
        return True
    except admin.exceptions.ReplicationGroupNotFoundFault:
        return False


def test_source_retain_is_the_default_behaviour(make_source: Callable[..., str],
                                                make_provider: Callable[..., AwsProvider], recorder: Recorder,
                                                admin: Any) -> None:
    src = make_source()
    outcome = make_provider(src).delete_source("Retain", MIGRATION, migration_completed=True)
    assert outcome.action == "retained" and _exists(admin, src)
    assert "DeleteReplicationGroup" not in recorder.operations()


def test_source_is_never_deleted_before_completion(make_source: Callable[..., str],
                                                   make_provider: Callable[..., AwsProvider], recorder: Recorder,
                                                   admin: Any) -> None:
    src = make_source()
    for policy in ("Delete", "SnapshotThenDelete"):
        outcome = make_provider(src).delete_source(policy, MIGRATION, migration_completed=False)
        assert outcome.action == "retained" and "did not complete" in outcome.reason
    assert _exists(admin, src) and not {"DeleteReplicationGroup", "CreateSnapshot"} & recorder.operations()


def test_source_snapshot_then_delete(make_source: Callable[..., str], make_provider: Callable[..., AwsProvider],
                                     recorder: Recorder, admin: Any) -> None:
    src = make_source()
    outcome = make_provider(src).delete_source("SnapshotThenDelete", MIGRATION, migration_completed=True)
    assert outcome.action == "snapshotted-and-deleted"
    assert outcome.snapshot == final_snapshot_name(src, MIGRATION) == f"{src}-final-shop-sessions"
    assert admin.describe_snapshots(SnapshotName=outcome.snapshot)["Snapshots"][0]["SnapshotStatus"] == "available"
    # The snapshot was complete before the delete was sent.
    ops = [name for name, _ in recorder.calls]
    assert ops.index("CreateSnapshot") < ops.index("DeleteReplicationGroup")
    admin.describe_replication_groups(ReplicationGroupId=src)  # "deleting" once (motoserver.py)
    assert not _exists(admin, src)
    # Retried after it is gone: still fine.
    again = make_provider(src).delete_source("SnapshotThenDelete", MIGRATION, migration_completed=True)
    assert again.action == "snapshotted-and-deleted"


def test_source_delete(make_source: Callable[..., str], make_provider: Callable[..., AwsProvider],
                       recorder: Recorder) -> None:
    src = make_source()
    assert make_provider(src).delete_source("Delete", MIGRATION, migration_completed=True).action == "deleted"
    assert recorder.params("DeleteReplicationGroup") == [{"ReplicationGroupId": src}]
    assert "CreateSnapshot" not in recorder.operations()


def test_target_policies(make_source: Callable[..., str], make_provider: Callable[..., AwsProvider],
                         recorder: Recorder, admin: Any) -> None:
    src = make_source()
    provider = make_provider(src)
    spec = spec_for()
    provider.ensure_target(spec)
    assert provider.delete_target(spec, "Retain", reached_flip=False).action == "retained"
    flipped = provider.delete_target(spec, "Delete", reached_flip=True)
    assert flipped.action == "retained" and "FLIP" in flipped.reason
    assert "DeleteReplicationGroup" not in recorder.operations()
    assert provider.delete_target(spec, "Delete", reached_flip=False).action == "deleted"
    assert recorder.params("DeleteReplicationGroup") == [{"ReplicationGroupId": spec.replication_group_id}]
    admin.describe_replication_groups(ReplicationGroupId=spec.replication_group_id)
    assert provider.delete_target(spec, "Delete", reached_flip=False).reason == "already gone"


def test_a_foreign_target_is_never_deleted(make_source: Callable[..., str],
                                           make_provider: Callable[..., AwsProvider], admin: Any) -> None:
    src = make_source()
    spec = spec_for()
    admin.create_replication_group(ReplicationGroupId=spec.replication_group_id, ReplicationGroupDescription="x")
    with pytest.raises(RefusedError, match="not owned by migration"):
        make_provider(src).delete_target(spec, "Delete", reached_flip=False)
    assert _exists(admin, spec.replication_group_id)


def test_unknown_policies_are_usage_errors(make_source: Callable[..., str],
                                           make_provider: Callable[..., AwsProvider]) -> None:
    provider = make_provider(make_source())
    with pytest.raises(UsageError, match="Retain, SnapshotThenDelete, Delete"):
        provider.delete_source("Snapshot", MIGRATION, migration_completed=True)
    with pytest.raises(UsageError, match="Retain, Delete, not 'SnapshotThenDelete'"):
        provider.delete_target(dataclasses.replace(spec_for()), "SnapshotThenDelete", reached_flip=False)
