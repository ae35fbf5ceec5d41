"""The provider interface the migration protocol drives, and the plain data it exchanges.

A provider answers four questions for the protocol: what is the source, can a durable target be
created as asked (preflight), make sure the target exists and is ready, and how does the engine
reach it. It also snapshots the source for seeding and applies the deletion policies at the end.

Everything here is synchronous: boto3 is synchronous, and a provider call is rare and slow
(seconds to minutes) compared with the engine's data path. The asyncio engine runs a provider call
in a worker thread (``asyncio.to_thread``) so the event loop keeps serving clients meanwhile.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Literal

from ..urls import Endpoint

Durability = Literal["sync", "async"]
DURABILITIES: tuple[str, ...] = ("sync", "async")
SOURCE_POLICIES: tuple[str, ...] = ("Retain", "SnapshotThenDelete", "Delete")
TARGET_POLICIES: tuple[str, ...] = ("Retain", "Delete")

# The tag that says "this cluster belongs to migration X": a restarted reconcile adopts a cluster only
# when this tag names its own migration, and deletes only clusters that carry it.
OWNER_TAG = "durablecache.dev/owner"
SOURCE_TAG = "durablecache.dev/source"


@dataclasses.dataclass(frozen=True)
class SourceDescription:
    """What the source cluster is, as far as the provider can tell (None = unknown)."""

    replication_group_id: str
    engine: str | None = None
    engine_version: str | None = None
    cluster_mode_enabled: bool | None = None
    shards: int | None = None
    replicas_per_shard: int | None = None
    node_type: str | None = None
    transit_encryption: bool | None = None
    at_rest_encryption: bool | None = None
    auth_token_enabled: bool | None = None
    user_group_ids: tuple[str, ...] = ()
    parameter_group: str | None = None
    subnet_group: str | None = None
    security_group_ids: tuple[str, ...] = ()
    kms_key_id: str | None = None
    maintenance_window: str | None = None
    port: int | None = None
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    status: str | None = None
    arn: str | None = None
    endpoint: Endpoint | None = None

    def summary(self) -> str:
        engine = f"{self.engine or '?'} {self.engine_version or '?'}"
        mode = {True: "cluster mode enabled", False: "cluster mode disabled", None: "cluster mode ?"}
        replicas = "?" if self.replicas_per_shard is None else self.replicas_per_shard
        return (f"{self.replication_group_id} ({engine}, {mode[self.cluster_mode_enabled]}, "
                f"{self.shards or '?'} shard(s) x {replicas} replica(s), {self.node_type or '?'})")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What the user asked for. ``None`` means "carry it over from the source" (or a safe default).

    The boolean switches exist so that a manifest that asks for something a durable cluster cannot
    have (no TLS, no cluster mode, ...) is refused by preflight with a fix, not silently corrected.
    """

    replication_group_id: str
    migration_id: str
    durability: str
    node_type: str | None = None
    engine: str = "valkey"
    engine_version: str = "9.0"
    shards: int | None = None
    replicas_per_shard: int | None = None
    cluster_mode_enabled: bool = True
    multi_az: bool = True
    transit_encryption: bool = True
    serverless: bool = False
    subnet_group: str | None = None
    security_group_ids: tuple[str, ...] | None = None
    user_group_ids: tuple[str, ...] | None = None
    # The AUTH token comes from the spec's Secret; the caller reads it and passes the value here.
    auth_token: str | None = dataclasses.field(default=None, repr=False)
    kms_key_id: str | None = None
    maintenance_window: str | None = None
    parameter_group: str | None = None
    port: int | None = None
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Seeding: create the target from this snapshot (made with snapshot_source or named by the user).
    seed_snapshot: str | None = None
    description: str | None = None
    # Observed or estimated write rate of the whole source, MiB/s (for the per-shard write warning).
    write_rate_mib_s: float | None = None


@dataclasses.dataclass(frozen=True)
class PlannedTarget:
    """The target exactly as it will be requested: the spec resolved against the source."""

    replication_group_id: str
    migration_id: str
    durability: str
    engine: str
    engine_version: str
    node_type: str | None
    shards: int
    replicas_per_shard: int
    cluster_mode_enabled: bool
    multi_az: bool
    transit_encryption: bool
    serverless: bool
    subnet_group: str | None
    security_group_ids: tuple[str, ...]
    user_group_ids: tuple[str, ...]
    auth_token: str | None = dataclasses.field(repr=False)
    kms_key_id: str | None
    maintenance_window: str | None
    parameter_group: str | None
    port: int | None
    tags: Mapping[str, str]
    seed_snapshot: str | None
    description: str
    write_rate_mib_s: float | None
    # Field names whose value came from the source (so a violation can say "carried from the source").
    carried: frozenset[str] = frozenset()

    def summary(self) -> str:
        return (f"{self.replication_group_id} ({self.engine} {self.engine_version}, {self.node_type or '?'}, "
                f"{self.shards} shard(s) x {self.replicas_per_shard} replica(s), durability {self.durability})")


@dataclasses.dataclass(frozen=True)
class Violation:
    """One reason a durable target cannot be created as asked, and what to change."""

    field: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}; fix: {self.fix}"


@dataclasses.dataclass(frozen=True)
class Advice:
    """A warning: creation can go ahead, but something may hurt (e.g. write rate per shard)."""

    field: str
    message: str
    suggestion: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}; suggestion: {self.suggestion}"


@dataclasses.dataclass(frozen=True)
class PreflightResult:
    violations: tuple[Violation, ...] = ()
    warnings: tuple[Advice, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.violations

    def message(self) -> str:
        """Every violation on its own line, for a RefusedError."""
        lines = [f"a durable target cannot be created as asked ({len(self.violations)} problem(s)):"]
        lines += [f"  - {v}" for v in self.violations]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    replication_group_id: str
    status: str
    durability: str | None = None
    effective_durability: str | None = None
    endpoint: Endpoint | None = None
    arn: str | None = None
    # True when this call created the cluster, False when it adopted one it had created before.
    created: bool = False


@dataclasses.dataclass(frozen=True)
class DeletionOutcome:
    """What a deletion policy did: ``retained``, ``deleted`` or ``snapshotted-and-deleted``."""

    resource: str
    action: str
    reason: str
    snapshot: str | None = None


class Provider(abc.ABC):
    """The calls the migration protocol makes. Implementations: ``aws`` and ``static``."""

    @abc.abstractmethod
    def describe_source(self) -> SourceDescription: ...

    @abc.abstractmethod
    def preflight(self, spec: TargetSpec) -> PreflightResult:
        """Every rule, checked before anything is created; never raises for a rule violation."""

    @abc.abstractmethod
    def ensure_target(self, spec: TargetSpec) -> TargetInfo:
        """Create the target, or adopt the one this migration created before. Idempotent."""

    @abc.abstractmethod
    def wait_ready(self, spec: TargetSpec, timeout: float | None = None) -> TargetInfo:
        """Wait (bounded) until the target is available with the durability asked for."""

    def ready_now(self, spec: TargetSpec) -> TargetInfo | None:
        """One look, no waiting: the target's info once it is ready as asked, None while it is still
        being made ready (the operator looks again later instead of holding a thread), RefusedError
        when it never will be. Providers whose targets are ready at once need not override it."""
        return self.wait_ready(spec)

    @abc.abstractmethod
    def endpoints(self, spec: TargetSpec, username: str | None = None) -> list[Endpoint]:
        """Where the engine connects to the target, with TLS and credentials filled in."""

    @abc.abstractmethod
    def snapshot_source(self, name: str, migration_id: str, timeout: float | None = None, *,
                        route_in_active: bool = False) -> str:
        """Snapshot the source (or reuse this migration's snapshot) and wait until it is usable.

        Refuses unless RouteIn is active: writes after the snapshot must already be marked dirty."""

    @abc.abstractmethod
    def set_durability(self, spec: TargetSpec) -> TargetInfo:
        """Switch the target between sync and async (durability itself cannot be turned off/on)."""

    @abc.abstractmethod
    def delete_source(self, policy: str, migration_id: str, migration_completed: bool) -> DeletionOutcome: ...

    def durability_lag_reader(self, spec: TargetSpec) -> Callable[[], float | None] | None:
        """A reader of the target's durability lag in seconds (laggovernor.py), where the provider can
        see it; None where it cannot (static targets)."""
        return None

    @abc.abstractmethod
    def delete_target(self, spec: TargetSpec, policy: str, reached_flip: bool) -> DeletionOutcome: ...
