"""Spec settings the CRD accepts but the operator does not act on yet are announced at Preflight (a
Warning event each), never silently dropped; spec.seeding is acted on now, and refused where it cannot be."""

from __future__ import annotations

from typing import Any

import pytest

from durablecache.k8s.spec import DurableCacheSpec, SpecError


def dcache(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "shop", "name": "sessions"},
            "spec": {"source": {"replicationGroupId": "sessions-prod"},
                     "target": {"replicationGroupId": "sessions-durable", "durability": "sync"},
                     "endpoint": {"secretName": "sessions"}, **spec}}


def ignored_settings(obj: dict[str, Any]) -> list[str]:
    return DurableCacheSpec.parse(obj).ignored_settings()


def test_defaults_and_acted_on_settings_raise_nothing() -> None:
    assert ignored_settings(dcache()) == []
    assert ignored_settings(dcache(seeding={"mode": "none"}, deletionPolicy={"source": "Delete", "target": "Delete"},
                                   cutover={"maxWritePause": "200ms", "drainBudget": "50ms"})) == []


def test_snapshot_seeding_is_acted_on_not_ignored() -> None:
    assert ignored_settings(dcache(seeding={"mode": "snapshot"}, deletionPolicy={"source": "SnapshotThenDelete"},
                                   cutover={"drainBudget": "50ms", "maxWritePause": "100ms"})) == []
    named = DurableCacheSpec.parse(dcache(seeding={"mode": "snapshot", "snapshotName": "s1"}))
    assert named.seeding.snapshot_name == "s1"


@pytest.mark.parametrize(("spec", "why"), [
    ({"target": {"provider": "static", "durability": "sync", "endpoints": [{"host": "t", "port": 6379}]}},
     "spec.target.provider aws"),
    ({"source": {"endpoints": [{"host": "s", "port": 6379}]}}, "spec.source.replicationGroupId"),
])
def test_snapshot_seeding_without_elasticache_is_refused_naming_the_field(spec: dict[str, Any], why: str) -> None:
    with pytest.raises(SpecError) as err:
        DurableCacheSpec.parse(dcache(seeding={"mode": "snapshot"}, **spec))
    assert err.value.field == "spec.seeding.mode", str(err.value)
    assert why in str(err.value)
