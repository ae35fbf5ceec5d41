"""The aws path to Complete with snapshot seeding on (issue 19, items 6 and 7): the operator on the real
kube-apiserver, the aws provider on moto in server mode, moto's endpoints mapped to local Valkey servers
(DURABLECACHE_TEST_ENDPOINT_MAP). The operator defers the target at Provision, the worker does RouteIn
with the source alone, then the operator snapshots the source, creates the target from the snapshot with
the durability override, and the worker catches up every key marked since RouteIn instead of copying.

moto holds no data: the test restores the target itself with seedstandin.py, THE STAND-IN FOR
ELASTICACHE'S RESTORE (the source's RDB, saved once the operator took its snapshot, loaded by the local
server the new group maps to). moto keeps the new group "creating" until that is done (the
dc-moto/hold-file tag, tests/aws/motoserver.py). Between the stand-in snapshot and the restore the test
writes keys through the proxy: they reach the target only through the syncer's marks."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import valkey
from kubernetes import client as k8s_client

from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.workload import seed
from seedstandin import restore, snapshot  # tests/ is on sys.path (rootdir insertion)

from .conftest import AWS_TEST_ENV, KubeEnv
from .test_aws_e2e import _engine_events, _manifest
from .test_operator import (  # noqa: F401 - operator_factory is a fixture
    MIGRATION_TIMEOUT,
    Cluster,
    Operator,
    _elasticache,
    _moto_source,
    assert_no_rbac_denials,
    assert_target_has_every_acked_write,
    migrating,
    operator_factory,
    phase_seen,
    wait_for,
)

SEEDED_KEYS = 2000
WINDOW_KEYS = 200
HOLD_TAG = "dc-moto/hold-file"


def _seeded_manifest(source_id: str, target_id: str, hold_file: Path, snapshot_name: str | None) -> dict[str, Any]:
    body = _manifest(source_id, target_id)
    body["spec"]["seeding"] = {"mode": "snapshot", **({"snapshotName": snapshot_name} if snapshot_name else {})}
    body["spec"]["target"]["overrides"] = {"tags": {HOLD_TAG: str(hold_file)}}
    return body


def _event_seen(cluster: Cluster, reason: str) -> Callable[[], bool]:
    def probe() -> bool:
        if cluster.phase("sessions") == "Failed":
            raise AssertionError(f"migration failed: {cluster.status('sessions').get('conditions')}")
        return any(r == reason for _, r, _ in cluster.events("sessions"))
    return probe


def _write_window(proxy: dict[str, str]) -> dict[str, str]:
    """Keys written through the proxy after the (stand-in) snapshot, before the restore."""
    written = {}
    with contextlib.closing(valkey.Valkey(host=proxy["host"], port=int(proxy["port"]), socket_timeout=10)) as c:
        for i in range(WINDOW_KEYS):
            key, value = f"window:{i}", f"after-snapshot-{i}"
            assert c.set(key, value)
            written[key] = value
    return written


def test_aws_migration_seeded_from_a_snapshot_runs_to_complete(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str, moto_server: str,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator],  # noqa: F811
        tmp_path: Path) -> None:
    r = _seeded_to_complete(kube_env, kube_api, kube_namespace, moto_server, make_server, operator_factory,
                            tmp_path, user_snapshot=False)
    assert r.status["checkpoint"]["operator"]["seedSnapshot"] == f"{r.target_id}-seed"
    # Nothing but the marks was needed: the only verify pass is the planned one that begins Sync.
    assert [e.get("planned") for e in _engine_events(r.op, "repair")] == [True]


def test_aws_migration_seeded_from_a_named_older_snapshot_is_fully_repaired(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str, moto_server: str,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator],  # noqa: F811
        tmp_path: Path) -> None:
    """spec.seeding.snapshotName: a snapshot taken before RouteIn; writes made between it and RouteIn
    were never marked, and reach the target through the full verify-and-repair the worker demands."""
    r = _seeded_to_complete(kube_env, kube_api, kube_namespace, moto_server, make_server, operator_factory,
                            tmp_path, user_snapshot=True)
    with contextlib.closing(r.target.client()) as c:
        assert {k: c.get(k) for k in r.before_route_in} == {k: v.encode() for k, v in r.before_route_in.items()}
    repairs = _engine_events(r.op, "repair")
    assert any("spec.seeding.snapshotName" in str(e.get("reason")) for e in repairs), repairs


@dataclasses.dataclass
class Seeded:
    op: Operator
    target: LocalServer
    target_id: str
    status: dict[str, Any]
    before_route_in: dict[str, str]


def _seeded_to_complete(kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str, moto_server: str,
                        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator],  # noqa: F811
                        tmp_path: Path, *, user_snapshot: bool) -> Seeded:
    source, target = make_server(engine="valkey8"), make_server(engine="valkey9")
    with contextlib.closing(source.client()) as c:
        seed(c, SEEDED_KEYS)
    source_id, target_id = _moto_source(moto_server), f"dst-{uuid.uuid4().hex[:8]}"
    hold = tmp_path / "restored"
    named: str | None = None
    rdb = b""
    before_route_in: dict[str, str] = {}
    if user_snapshot:
        # The user's snapshot, taken before the migration (moto's record, and the stand-in's data) ...
        named = f"{source_id}-nightly"
        _elasticache(moto_server).create_snapshot(ReplicationGroupId=source_id, SnapshotName=named)
        rdb = snapshot(source)
        # ... then writes straight to the source, before any proxy: nobody marks them.
        with contextlib.closing(source.client()) as c:
            for i in range(WINDOW_KEYS):
                before_route_in[f"before-route-in:{i}"] = f"unmarked-{i}"
                assert c.set(f"before-route-in:{i}", f"unmarked-{i}")
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    op = operator_factory(
        **AWS_TEST_ENV, AWS_ENDPOINT_URL_ELASTICACHE=moto_server, AWS_ENDPOINT_URL_CLOUDWATCH=moto_server,
        DURABLECACHE_TEST_ENDPOINT_MAP=f"{source_id}=127.0.0.1:{source.port},{target_id}=127.0.0.1:{target.port}")
    with migrating(cluster, source, op, _seeded_manifest(source_id, target_id, hold, named)) as app:
        # RouteIn passed (the app is on the proxy), the operator took its snapshot and asked for the target.
        wait_for("the operator's snapshot of the source", _event_seen(cluster, "SnapshotTaken"), MIGRATION_TIMEOUT)
        wait_for("the target requested from the snapshot", _event_seen(cluster, "TargetCreated"), 30)
        proxy = cluster.secret("app-cache")
        assert proxy["port"] not in (str(source.port), str(target.port)), proxy
        if not user_snapshot:
            rdb = snapshot(source)              # stand-in: the snapshot's point in time
        window = _write_window(proxy)
        restore(rdb, target)                    # stand-in: ElastiCache restores the new cluster
        with contextlib.closing(target.client()) as c:
            assert c.dbsize() >= SEEDED_KEYS and c.get("window:0") is None
        hold.touch()                            # moto may now report the group available
        wait_for("Complete", phase_seen(cluster, "sessions", {"Complete"}), MIGRATION_TIMEOUT)
        wait_for("the endpoint Secret to point at the target",
                 lambda: cluster.secret("app-cache")["port"] == str(target.port), 20)
        direct = f"127.0.0.1:{target.port}"
        wait_for("the application on the target", lambda: app.addresses[-1:] == [direct], 20)
        after_switch = app.load.acked
        wait_for("writes acknowledged by the target", lambda: app.load.acked >= after_switch + 50, 20)
    assert_target_has_every_acked_write(app, target, min_keys=SEEDED_KEYS)
    with contextlib.closing(target.client()) as c:
        assert {k: c.get(k) for k in window} == {k: v.encode() for k, v in window.items()}

    (rg,) = _elasticache(moto_server).describe_replication_groups(ReplicationGroupId=target_id)["ReplicationGroups"]
    assert (rg["Durability"], rg["EffectiveDurability"]) == ("sync", "sync")   # the override, read back
    status = cluster.status("sessions")
    assert status["targetDurability"] == "sync"
    seeded = _engine_events(op, "seeded")
    assert seeded and seeded[0]["backlog"] >= WINDOW_KEYS, seeded    # the window's marks, waiting for the target
    assert not _engine_events(op, "copied")                          # no bulk copy
    reasons = [reason for _, reason, _ in cluster.events("sessions")]
    assert "SettingIgnored" not in reasons
    for phase in ("Preflight", "Provision", "SeedingDeferred", "RouteIn", "Copy", "SnapshotTaken", "TargetCreated",
                  "TargetReady", "Seeded", "Sync", "Cutover", "RouteOut", "Complete"):
        assert phase in reasons, (phase, reasons)
    assert reasons.index("RouteIn") < reasons.index("SnapshotTaken") < reasons.index("TargetReady")
    assert_no_rbac_denials(op)
    return Seeded(op, target, target_id, status, before_route_in)
