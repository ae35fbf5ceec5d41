"""The ``static`` provider: endpoints the user gives (self-managed Valkey, or a durable cluster that was
created elsewhere). It creates, snapshots and deletes nothing; it cannot see how the target was
created, so its preflight says so as a warning instead of pretending to have checked durability."""

from __future__ import annotations

import dataclasses

from ..errors import UsageError
from ..urls import Endpoint
from .base import (
    DURABILITIES,
    SOURCE_POLICIES,
    TARGET_POLICIES,
    Advice,
    DeletionOutcome,
    PreflightResult,
    Provider,
    SourceDescription,
    TargetInfo,
    TargetSpec,
    Violation,
)


class StaticProvider(Provider):
    def __init__(self, source: Endpoint, targets: list[Endpoint], source_name: str = "source"):
        if not targets:
            raise UsageError("the static provider needs at least one target endpoint")
        self.source = source
        self.targets = list(targets)
        self.source_name = source_name

    def describe_source(self) -> SourceDescription:
        return SourceDescription(replication_group_id=self.source_name, transit_encryption=self.source.tls,
                                 auth_token_enabled=self.source.password is not None, endpoint=self.source)

    def preflight(self, spec: TargetSpec) -> PreflightResult:
        violations = []
        if spec.durability not in DURABILITIES:
            violations.append(Violation("target.durability", f"{spec.durability!r} is not sync or async",
                                        "set durability to sync or async"))
        if self.source.address in {t.address for t in self.targets}:
            violations.append(Violation("target.endpoints", "a target endpoint is the source itself",
                                        "point the target at the durable cluster, not the source"))
        warning = Advice("target.provider", "static endpoints: DurableCache did not create this target and "
                         "cannot check that it is durable", "create it with Durability=sync|async (Valkey >= 9.0)")
        return PreflightResult(tuple(violations), (warning,))

    def ensure_target(self, spec: TargetSpec) -> TargetInfo:
        return TargetInfo(replication_group_id=spec.replication_group_id or self.targets[0].address,
                          status="available", endpoint=self.targets[0], created=False)

    def wait_ready(self, spec: TargetSpec, timeout: float | None = None) -> TargetInfo:
        # Reachability is the engine's to check (it connects with the real credentials).
        return self.ensure_target(spec)

    def endpoints(self, spec: TargetSpec, username: str | None = None) -> list[Endpoint]:
        out = []
        for ep in self.targets:
            # Credentials from the spec's secret fill in what the URL left out.
            password = ep.password if ep.password is not None else spec.auth_token
            out.append(dataclasses.replace(ep, password=password, username=ep.username or username))
        return out

    def snapshot_source(self, name: str, migration_id: str, timeout: float | None = None, *,
                        route_in_active: bool = False) -> str:
        raise UsageError("snapshot seeding needs the aws provider; the static provider copies keys only")

    def set_durability(self, spec: TargetSpec) -> TargetInfo:
        raise UsageError("the static provider cannot change durability: change it where the target was created")

    def delete_source(self, policy: str, migration_id: str, migration_completed: bool) -> DeletionOutcome:
        if policy not in SOURCE_POLICIES:
            raise UsageError(f"source deletion policy must be one of {', '.join(SOURCE_POLICIES)}, not {policy!r}")
        if policy != "Retain":
            raise UsageError(f"deletion policy {policy} needs the aws provider; the static provider deletes nothing")
        return DeletionOutcome(self.source_name, "retained", "deletion policy Retain")

    def delete_target(self, spec: TargetSpec, policy: str, reached_flip: bool) -> DeletionOutcome:
        if policy not in TARGET_POLICIES:
            raise UsageError(f"target deletion policy must be one of {', '.join(TARGET_POLICIES)}, not {policy!r}")
        if policy != "Retain":
            raise UsageError(f"deletion policy {policy} needs the aws provider; the static provider deletes nothing")
        return DeletionOutcome(spec.replication_group_id, "retained", "deletion policy Retain")
