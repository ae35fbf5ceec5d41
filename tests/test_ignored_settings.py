"""Spec settings the CRD accepts but the operator does not act on yet are announced at Preflight (a
Warning event each), never silently dropped."""

from __future__ import annotations

from typing import Any

from durablecache.k8s.spec import DurableCacheSpec


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


def test_each_setting_not_acted_on_is_named() -> None:
    messages = ignored_settings(dcache(seeding={"mode": "snapshot"}, deletionPolicy={"source": "SnapshotThenDelete"},
                                       cutover={"drainBudget": "50ms", "maxWritePause": "100ms"}))
    assert len(messages) == 1
    assert "spec.seeding.mode snapshot" in messages[0]
