"""The operator end to end on servers that refuse what ElastiCache refuses (docs/aws.md, "Commands
ElastiCache refuses"): CONFIG, DEBUG, SYNC/PSYNC, REPLICAOF/SLAVEOF, SAVE/BGSAVE/BGREWRITEAOF, SHUTDOWN
and MIGRATE renamed away on the source and the target. Preflight, the worker (proxy, copy, syncer,
gate, witness, verify), the cutover and the endpoint switch must all do without them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import valkey
from kubernetes import client as k8s_client

from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.waiting import wait_for
from durablecache.testing.workload import seed

from .conftest import KubeEnv
from .test_operator import (  # noqa: F401 - operator_factory is a fixture
    MIGRATION_TIMEOUT,
    Cluster,
    Operator,
    assert_no_rbac_denials,
    assert_target_has_every_acked_write,
    durablecache,
    migrating,
    operator_factory,
    phase_seen,
    writes_on_target,
)


def test_an_operator_migration_between_elasticache_restricted_servers(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator]) -> None:  # noqa: F811
    source = make_server(engine="valkey8", elasticache=True)
    target = make_server(engine="valkey9", elasticache=True)
    for server in (source, target):     # the servers really refuse them
        with contextlib.closing(server.client()) as c, pytest.raises(valkey.ResponseError, match="unknown command"):
            c.execute_command("CONFIG", "GET", "maxclients")
    with contextlib.closing(source.client()) as c:
        seed(c, 2000)
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    op = operator_factory()
    with migrating(cluster, source, op, durablecache("restricted", source, target, mode="auto")) as app:
        wait_for("Complete", phase_seen(cluster, "restricted", {"Complete"}), MIGRATION_TIMEOUT)
        wait_for("the endpoint Secret to point at the target",
                 lambda: cluster.secret("app-cache")["port"] == str(target.port), 20)
        writes_on_target(app, target)   # the load writes to the target directly for a moment
    assert_target_has_every_acked_write(app, target, min_keys=2000)
    reasons = [reason for _, reason, _ in cluster.events("restricted")]
    for phase in ("Preflight", "Provision", "RouteIn", "Copy", "Sync", "Cutover", "RouteOut", "Complete"):
        assert phase in reasons, (phase, reasons)
    warnings = [reason for type_, reason, _ in cluster.events("restricted") if type_ == "Warning"]
    assert warnings == ["PreflightWarning"], warnings     # the static target's durability, as always
    assert_no_rbac_denials(op)
