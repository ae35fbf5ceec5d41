"""The operator's and the worker's status logic without an API server: conditions, progress, the
applications' endpoint, and the worker's one status writer (StatusStore). ``StatusObject`` stands in
for the API server's side of what these call: one stored object, changed by JSON merge patches
(RFC 7386) as the status subresource changes it; tests/kube runs the same code against a real one."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest

from durablecache.k8s.endpoints import desired_route, restart_workloads, secret_data, switch
from durablecache.k8s.lease import LeaseLost, LeaseTimings
from durablecache.k8s.status import condition, conditions_for, merge_diff, progress
from durablecache.k8s.store import StatusStore
from durablecache.phases import PROXIED_PHASES, Phase


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class StatusObject:
    """One DurableCache as the API server keeps it, and the other objects the endpoint switch writes."""

    def __init__(self, generation: int = 1):
        self.obj: dict[str, Any] = {"metadata": {"namespace": "shop", "name": "sessions", "generation": generation},
                                    "spec": {"endpoint": {"secretName": "sessions", "serviceName": "sessions",
                                                          "restartWorkloads": [{"kind": "Deployment",
                                                                                "name": "cart"}]}}}
        self.patches: list[dict[str, Any]] = []
        self.secrets: dict[str, dict[str, str]] = {}
        self.services: dict[str, tuple[str, int]] = {}
        self.restarted: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    @property
    def status(self) -> dict[str, Any]:
        return self.obj.get("status") or {}

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            return copy.deepcopy(self.obj)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        with self.lock:
            self.patches.append(copy.deepcopy(status))
            self.obj = merge_patch(self.obj, {"status": status})

    def apply_secret(self, namespace: str, name: str, data: dict[str, str], owner: dict[str, Any]) -> bool:
        old = self.secrets.get(name, {})
        self.secrets[name] = {**old, **data}
        return self.secrets[name] != old

    def apply_external_name(self, namespace: str, name: str, host: str, port: int, owner: dict[str, Any]) -> bool:
        changed = self.services.get(name) != (host, port)
        self.services[name] = (host, port)
        return changed

    def restart_workload(self, namespace: str, kind: str, name: str, reason: str) -> None:
        self.restarted.append((kind, name, reason))


# -- conditions and progress ---------------------------------------------------------------------
def test_a_condition_keeps_its_transition_time_until_its_status_changes() -> None:
    first = condition("Ready", False, "Copying", "copying", 1, [])
    first["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    same = condition("Ready", False, "Syncing", "in sync", 2, [first])
    assert same["lastTransitionTime"] == "2020-01-01T00:00:00Z" and same["observedGeneration"] == 2
    flipped = condition("Ready", True, "MigrationComplete", "done", 2, [same])
    assert flipped["lastTransitionTime"] != "2020-01-01T00:00:00Z" and flipped["status"] == "True"


def by_type(conds: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in conds}


def test_conditions_for_each_kind_of_phase() -> None:
    assert by_type(conditions_for(Phase.COPY, "", 1, [])) == {
        "Ready": ("False", "Copying"), "Progressing": ("True", "Copying"), "Degraded": ("False", "AsExpected")}
    assert by_type(conditions_for(Phase.SYNC, "", 1, [], awaiting_approval=True))["Ready"] == \
        ("False", "AwaitingApproval")
    assert by_type(conditions_for(Phase.COMPLETE, "", 1, [])) == {
        "Ready": ("True", "MigrationComplete"), "Progressing": ("False", "MigrationComplete"),
        "Degraded": ("False", "AsExpected")}
    assert by_type(conditions_for(Phase.FAILED, "boom", 1, [], failure_reason="PreflightFailed")) == {
        "Ready": ("False", "PreflightFailed"), "Progressing": ("False", "PreflightFailed"),
        "Degraded": ("True", "PreflightFailed")}
    assert by_type(conditions_for(Phase.SYNC, "", 1, [], degraded=("RepairBlocked", "asks")))["Degraded"] == \
        ("True", "RepairBlocked")


def test_every_phase_has_a_progressing_reason_of_its_own() -> None:
    reasons = {p: by_type(conditions_for(p, "", None, []))["Progressing"][1] for p in Phase}
    assert all(reasons.values()) and reasons[Phase.PROVISION] == "Provisioning"


def test_progress_counts_only_during_the_copy() -> None:
    assert progress(10, 40, Phase.ROUTE_IN)["percent"] == 0
    assert progress(10, 40, Phase.COPY) == {"percent": 25, "display": "25%", "keysCopied": 10, "keysTotal": 40}
    assert progress(40, 40, Phase.COPY)["percent"] == 99     # 100 only once the copy is over
    assert progress(0, 0, Phase.SYNC)["percent"] == 100


def test_merge_diff_is_the_patch_that_makes_new_from_old() -> None:
    old = {"a": 1, "b": {"c": 2, "d": 3}, "gone": True}
    new = {"a": 1, "b": {"c": 5, "d": 3}, "added": [1]}
    diff = merge_diff(old, new)
    assert diff == {"b": {"c": 5}, "added": [1], "gone": None}
    assert merge_patch(old, diff) == new


# -- the applications' endpoint -------------------------------------------------------------------
def test_the_route_follows_the_phase() -> None:
    for phase in PROXIED_PHASES:
        assert desired_route(phase, {}, proxy_up=True) == "proxy"
        assert desired_route(phase, {}, proxy_up=False) is None   # nobody answers there yet
    assert desired_route(Phase.ROUTE_OUT, {}, True) == desired_route(Phase.COMPLETE, {}, True) == "target"
    assert desired_route(Phase.ROLLED_BACK, {}, True) == "source"
    assert desired_route(Phase.FAILED, {"flipped": True}, True) == "target"
    assert desired_route(Phase.FAILED, {}, True) == "source"
    assert desired_route(Phase.PROVISION, {}, True) is None and desired_route(None, {}, True) is None


def test_the_switch_writes_secret_and_service_and_restarts_the_workloads() -> None:
    api = StatusObject()
    assert secret_data("h", 1, True) == {"host": "h", "port": "1", "tls": "true", "url": "valkeys://h:1"}
    assert switch(api, api.obj, "proxy.shop.svc", 6379, False)  # type: ignore[arg-type]
    assert api.secrets["sessions"]["url"] == "valkey://proxy.shop.svc:6379"
    assert api.services["sessions"] == ("proxy.shop.svc", 6379)
    assert not switch(api, api.obj, "proxy.shop.svc", 6379, False)  # type: ignore[arg-type]  # idempotent
    assert restart_workloads(api, api.obj, "endpoint -> proxy") == ["Deployment/cart"]  # type: ignore[arg-type]
    assert api.restarted == [("Deployment", "cart", "endpoint -> proxy")]


# -- the worker's status writer -------------------------------------------------------------------
def store_on(api: StatusObject, phases: list[tuple[Phase, dict[str, Any]]] | None = None) -> StatusStore:
    store = StatusStore(api, "shop", "sessions", interval=0.05,  # type: ignore[arg-type]
                        on_phase=(lambda p, s: phases.append((p, s))) if phases is not None else None)
    assert store.load() == {}
    return store


def test_a_phase_change_is_written_at_once_with_conditions_and_observed_generation() -> None:
    api, seen = StatusObject(generation=4), []
    store = store_on(api, seen)
    store.save({"phase": "Copy", "version": 1})
    assert api.status["phase"] == "Copy" and api.status["observedGeneration"] == 4
    assert by_type(api.status["conditions"])["Progressing"] == ("True", "Copying")
    assert api.status["checkpoint"]["migration"] == {"phase": "Copy", "version": 1}
    assert [p for p, _ in seen] == [Phase.COPY]
    store.save({"phase": "Copy", "version": 1, "flipped": True})    # authority: written before save returns
    assert api.status["checkpoint"]["migration"]["flipped"] is True
    store.close()


def test_other_saves_are_coalesced_and_flushed() -> None:
    api = StatusObject()
    store = store_on(api)
    store.save({"phase": "Copy"})
    writes = len(api.patches)
    for cursor in range(50):
        store.save({"phase": "Copy", "copy": {"cursor": cursor}})
    store.close()   # flushes what is pending
    assert api.status["checkpoint"]["migration"]["copy"] == {"cursor": 49}
    assert len(api.patches) - writes < 50


def test_report_writes_only_what_changed_and_flags_rewrite_the_conditions() -> None:
    api = StatusObject(generation=1)
    store = store_on(api)
    store.save({"phase": "Sync"})
    store.report({"dirtyBacklog": 3, "sideChanges": 0})
    before = len(api.patches)
    store.report({"dirtyBacklog": 3, "sideChanges": 0})
    assert len(api.patches) == before
    store.report({"dirtyBacklog": 0, "sideChanges": 0})
    assert api.patches[-1] == {"dirtyBacklog": 0}
    store.set_flags(awaiting_approval=True)
    assert by_type(api.status["conditions"])["Ready"] == ("False", "AwaitingApproval")
    store.set_flags(repair_blocked="a repair would delete 90 keys", generation=2)
    assert by_type(api.status["conditions"])["Degraded"] == ("True", "RepairBlocked")
    assert api.status["observedGeneration"] == 2
    store.save({"phase": "Cutover"})        # a new phase: no longer awaiting approval
    assert by_type(api.status["conditions"])["Ready"] == ("False", "CuttingOver")
    store.close()


def test_a_fenced_store_writes_nothing_once_the_lease_is_gone() -> None:
    """The coordinator lease's ``valid`` is asked before every write: a critical save raises LeaseLost
    (the engine must not go on as if it were persisted), a coalesced one is dropped, nothing is patched."""
    api, held = StatusObject(), [True]
    store = StatusStore(api, "shop", "sessions", interval=0.05, fence=lambda: held[0])  # type: ignore[arg-type]
    store.load()
    store.set_coordinator("pod-a-1234", 3)
    store.save({"phase": "Sync", "version": 1})
    assert api.status["coordinator"] == {"holder": "pod-a-1234", "epoch": 3} and api.status["phase"] == "Sync"
    written = len(api.patches)
    held[0] = False
    with pytest.raises(LeaseLost):
        store.save({"phase": "Sync", "version": 1, "flipped": True})
    with pytest.raises(LeaseLost):
        store.report({"dirtyBacklog": 5})
    store.save({"phase": "Sync", "version": 1, "copy": {"cursor": 9}})
    store.close()
    assert len(api.patches) == written
    assert "flipped" not in api.status["checkpoint"]["migration"]


def test_lease_timings_keep_the_holder_stopping_before_a_takeover() -> None:
    assert LeaseTimings().margin == 5.0     # the documented default margin (docs/operator.md)
    LeaseTimings(duration=5, renew_deadline=3.0, retry_period=0.5).check()
    for bad in (LeaseTimings(duration=5, renew_deadline=5.0, retry_period=1.0),     # no margin
                LeaseTimings(duration=5, renew_deadline=3.0, retry_period=3.0),     # no second renewal
                LeaseTimings(duration=5, renew_deadline=3.0, retry_period=0.0)):
        with pytest.raises(ValueError):
            bad.check()
