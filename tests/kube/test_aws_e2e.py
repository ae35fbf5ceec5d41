"""The aws path to Complete (issue 19, item 7): the operator on the real kube-apiserver, the aws provider on
moto in server mode, and moto's invented endpoints mapped to local Valkey servers through the provider's
documented test seam (DURABLECACHE_TEST_ENDPOINT_MAP, docs/aws.md). Every phase runs, under a write load
with a ledger of acknowledged writes, and after Complete the target is switched between sync and async
durability with ModifyReplicationGroup."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s_client

from durablecache.movers import DEFAULT_TARGET_BYTES_PER_PRIMARY
from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.waiting import wait_for
from durablecache.testing.workload import seed

from .conftest import AWS_TEST_ENV, KubeEnv
from .test_operator import (  # noqa: F401 - operator_factory is a fixture
    MIGRATION_TIMEOUT,
    Cluster,
    Operator,
    _aws_durablecache,
    _elasticache,
    _moto_source,
    assert_no_rbac_denials,
    assert_target_has_every_acked_write,
    migrating,
    operator_factory,
    phase_seen,
)


def _manifest(source_id: str, target_id: str) -> dict[str, Any]:
    body = _aws_durablecache(source_id, target_id, "Retain")
    spec = body["spec"]
    # The local servers speak plain TCP; ElastiCache (and moto) report TLS endpoints.
    spec["source"]["tls"] = {"enabled": False}
    spec["target"]["tls"] = {"enabled": False}
    spec.pop("proxy")      # a plain-TCP source: the proxy serves plain TCP too (the app speaks no TLS)
    spec["routeIn"] = {"settlePeriod": "1s"}
    spec["cutover"] = {"mode": "auto", "maxWritePause": "1s", "drainBudget": "800ms", "rollbackWindow": "2s"}
    return body


def _publish_lag(cloudwatch: Any, target_id: str, millis: float) -> None:
    """DurabilityLag of the target's nodes, published before the target exists: its node names
    (<replication group>-<shard>-<node>, as ElastiCache and moto name them) are known in advance, so the
    worker's first reading finds it."""
    cloudwatch.put_metric_data(Namespace="AWS/ElastiCache", MetricData=[
        {"MetricName": "DurabilityLag", "Value": millis, "Unit": "Milliseconds",
         "Dimensions": [{"Name": "CacheClusterId", "Value": f"{target_id}-0001-00{n}"},
                        {"Name": "CacheNodeId", "Value": "0001"}]}
        for n in (1, 2)])


def _engine_events(op: Operator, kind: str) -> list[dict[str, Any]]:
    """The worker's log lines (JSON) for one kind of engine event."""
    out = []
    for path in sorted(op.state.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("engine_event") == kind:
                    out.append(entry)
    return out


def test_aws_migration_runs_to_complete_then_switches_durability(
        kube_env: KubeEnv, kube_api: k8s_client.ApiClient, kube_namespace: str, moto_server: str,
        make_server: Callable[..., LocalServer], operator_factory: Callable[..., Operator]) -> None:  # noqa: F811
    import boto3

    source, target = make_server(engine="valkey8"), make_server(engine="valkey9")
    with contextlib.closing(source.client()) as c:
        seed(c, 2000)
    source_id, target_id = _moto_source(moto_server), f"dst-{uuid.uuid4().hex[:8]}"
    ec = _elasticache(moto_server)
    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto_server, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
    cluster = Cluster(kube_api, kube_env, kube_namespace)
    op = operator_factory(
        **AWS_TEST_ENV, AWS_ENDPOINT_URL_ELASTICACHE=moto_server, AWS_ENDPOINT_URL_CLOUDWATCH=moto_server,
        DURABLECACHE_TEST_ENDPOINT_MAP=f"{source_id}=127.0.0.1:{source.port},{target_id}=127.0.0.1:{target.port}")
    _publish_lag(cloudwatch, target_id, 300.0)     # what the worker's lag reader finds
    with migrating(cluster, source, op, _manifest(source_id, target_id)) as app:
        wait_for("Complete", phase_seen(cluster, "sessions", {"Complete"}), MIGRATION_TIMEOUT)
        secret = wait_for("the endpoint Secret to point at the target",
                          lambda: (s := cluster.secret("app-cache"))["port"] == str(target.port) and s, 20)
        # The load writes to the target directly for a while: it follows the Secret, then 50 more
        # acknowledged writes (not a sleep: a busy machine may need longer).
        direct = f"127.0.0.1:{target.port}"
        wait_for("the application on the target", lambda: app.addresses[-1:] == [direct], 20)
        after_switch = app.load.acked
        wait_for("writes acknowledged by the target", lambda: app.load.acked >= after_switch + 50, 20)
    assert secret["host"] == "127.0.0.1"
    assert_target_has_every_acked_write(app, target, min_keys=2000)

    status = cluster.status("sessions")
    operator_checkpoint = status["checkpoint"]["operator"]
    # The endpoints the operator stored are the mapped ones, with TLS as the spec says.
    assert (operator_checkpoint["source"]["port"], operator_checkpoint["target"]["port"]) == (source.port, target.port)
    assert status["targetDurability"] == "sync"
    assert status["targetName"] == target_id and status["sourceName"] == source_id
    # The worker read the target's DurabilityLag (300 ms: no need to slow down) through the aws provider
    # while it wrote to the target; after FLIP no governor runs (status.durabilityLag is then unset).
    readings = _engine_events(op, "durability_lag")
    assert readings and readings[0]["lag_s"] == 0.3, readings
    assert readings[0]["rate_bytes_per_s"] == DEFAULT_TARGET_BYTES_PER_PRIMARY
    assert status.get("durabilityLag") is None
    reasons = [reason for _, reason, _ in cluster.events("sessions")]
    for phase in ("Preflight", "Provision", "TargetCreated", "TargetReady", "RouteIn", "Copy", "Sync", "Cutover",
                  "RouteOut", "Complete"):
        assert phase in reasons, (phase, reasons)

    # After Complete: sync -> async -> sync, each through ModifyReplicationGroup and read back.
    for durability in ("async", "sync"):
        cluster.patch_spec("sessions", {"target": {"durability": durability}})
        wait_for(f"targetDurability {durability}",
                 lambda d=durability: cluster.status("sessions").get("targetDurability") == d, 60)
        (rg,) = ec.describe_replication_groups(ReplicationGroupId=target_id)["ReplicationGroups"]
        assert (rg["Durability"], rg["EffectiveDurability"]) == (durability, durability)
    changed = [m for _, reason, m in cluster.events("sessions") if reason == "DurabilityChanged"]
    assert [m.rsplit(" ", 1)[1] for m in changed] == ["async", "sync"], changed
    assert cluster.phase("sessions") == "Complete"
    assert_no_rbac_denials(op)
