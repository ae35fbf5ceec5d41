"""The aws provider against moto in server mode: describe, create, wait, adopt, endpoints, durability."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import structlog
from awstest import FakeClock, Recorder, unique

from durablecache import logs
from durablecache.errors import RefusedError, UsageError
from durablecache.providers.aws import AwsProvider
from durablecache.providers.awserrors import AwsNotFound, AwsQuotaExceeded
from durablecache.providers.base import OWNER_TAG, SOURCE_TAG, TargetSpec
from durablecache.resp import Connection
from durablecache.testing.localvalkey import LocalServer
from durablecache.urls import Endpoint

TOKEN = "a-valid-token-0123456789"


def spec_for(source_id: str, **kw: Any) -> TargetSpec:
    kw.setdefault("replication_group_id", unique("tgt"))
    kw.setdefault("migration_id", "shop/sessions")
    kw.setdefault("durability", "sync")
    return TargetSpec(**kw)


def test_describe_source_reads_the_group_and_its_member_clusters(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider]) -> None:
    src = make_source(shards=3, replicas=2, auth_token=TOKEN, kms_key_id="key-123")
    d = make_provider(src).describe_source()
    assert (d.engine, d.engine_version, d.node_type) == ("redis", "7.1", "cache.r6g.large")
    assert (d.cluster_mode_enabled, d.shards, d.replicas_per_shard) == (True, 3, 2)
    assert (d.transit_encryption, d.at_rest_encryption, d.auth_token_enabled) == (True, True, True)
    assert (d.subnet_group, d.security_group_ids) == (f"{src}-subnets", ("sg-0aaa", "sg-0bbb"))
    assert (d.parameter_group, d.maintenance_window) == ("default.redis7.cluster.on", "sun:05:00-sun:06:00")
    assert d.kms_key_id == "key-123" and d.tags == {"team": "shop", "env": "prod"}
    assert d.endpoint is not None and d.endpoint.tls and d.endpoint.host.startswith("clustercfg.")


def test_missing_source_is_one_clear_error(make_provider: Callable[..., AwsProvider]) -> None:
    with pytest.raises(AwsNotFound, match="source replication group 'nope-123' not found"):
        make_provider("nope-123").describe_source()


def test_create_sends_explicit_durability_and_the_durable_settings(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], recorder: Recorder,
        clock: FakeClock) -> None:
    src = make_source(kms_key_id="key-123")
    spec = spec_for(src, node_type="cache.r7g.large", auth_token=TOKEN, tags={"cost-center": "42"})
    provider = make_provider(src)
    info = provider.ensure_target(spec)
    assert info.created and info.replication_group_id == spec.replication_group_id

    (sent,) = recorder.params("CreateReplicationGroup")
    assert sent["Durability"] == "sync"
    assert (sent["Engine"], sent["EngineVersion"], sent["ClusterMode"]) == ("valkey", "9.0", "enabled")
    assert (sent["MultiAZEnabled"], sent["AutomaticFailoverEnabled"]) == (True, True)
    assert (sent["TransitEncryptionEnabled"], sent["AtRestEncryptionEnabled"]) == (True, True)
    assert (sent["NumNodeGroups"], sent["ReplicasPerNodeGroup"], sent["CacheNodeType"]) == (2, 1, "cache.r7g.large")
    # Carried over from the source.
    assert sent["CacheSubnetGroupName"] == f"{src}-subnets"
    assert sent["SecurityGroupIds"] == ["sg-0aaa", "sg-0bbb"]
    assert (sent["KmsKeyId"], sent["PreferredMaintenanceWindow"]) == ("key-123", "sun:05:00-sun:06:00")
    assert sent["AuthToken"] == TOKEN and "CacheParameterGroupName" not in sent
    tags = {t["Key"]: t["Value"] for t in sent["Tags"]}
    assert tags == {"team": "shop", "env": "prod", "cost-center": "42", OWNER_TAG: "shop/sessions",
                    SOURCE_TAG: src}
    # What went over the wire, not only what we handed to botocore.
    assert b"Durability=sync" in recorder.body("CreateReplicationGroup")

    ready = provider.wait_ready(spec)
    assert (ready.status, ready.durability, ready.effective_durability) == ("available", "sync", "sync")
    assert clock.sleeps == [5.0]  # one "creating" poll, then available


def test_ready_now_looks_once_and_never_waits(make_source: Callable[..., str],
                                             make_provider: Callable[..., AwsProvider], clock: Any) -> None:
    """The operator's Provision: one look per reconcile pass (it requeues in between), no sleep here."""
    src = make_source()
    provider = make_provider(src)
    spec = spec_for(src)
    provider.ensure_target(spec)
    assert provider.ready_now(spec) is None                   # moto answers "creating" first
    ready = provider.ready_now(spec)
    assert ready is not None and (ready.status, ready.effective_durability) == ("available", "sync")
    assert clock.sleeps == []


def test_async_durability_is_sent_as_asked(make_source: Callable[..., str],
                                           make_provider: Callable[..., AwsProvider], recorder: Recorder) -> None:
    src = make_source(node_type="cache.m7g.large")
    provider = make_provider(src)
    spec = spec_for(src, durability="async")
    provider.ensure_target(spec)
    assert recorder.params("CreateReplicationGroup")[0]["Durability"] == "async"
    assert b"Durability=async" in recorder.body("CreateReplicationGroup")
    assert provider.wait_ready(spec).effective_durability == "async"


def test_preflight_violations_stop_before_any_create(make_source: Callable[..., str],
                                                     make_provider: Callable[..., AwsProvider],
                                                     recorder: Recorder) -> None:
    src = make_source(node_type="cache.t4g.medium")
    spec = spec_for(src, engine_version="8.1", replicas_per_shard=0)
    provider = make_provider(src)
    assert [v.field for v in provider.preflight(spec).violations] == [
        "target.engineVersion", "target.nodeType", "target.replicasPerShard"]
    with pytest.raises(RefusedError) as exc:
        provider.ensure_target(spec)
    assert "3 problem(s)" in str(exc.value) and "cache.r7g.large" in str(exc.value)
    assert "CreateReplicationGroup" not in recorder.operations()


def test_ensure_target_is_idempotent_across_retries_and_restarts(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], recorder: Recorder) -> None:
    src = make_source()
    spec = spec_for(src)
    first = make_provider(src).ensure_target(spec)
    again = make_provider(src).ensure_target(spec)  # a restarted operator: a new provider and client
    assert first.created and not again.created
    assert make_provider(src).ensure_target(spec).replication_group_id == spec.replication_group_id
    assert len(recorder.params("CreateReplicationGroup")) == 1


def test_a_create_race_adopts_instead_of_creating_twice(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], recorder: Recorder,
        monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_source()
    spec = spec_for(src)
    make_provider(src).ensure_target(spec)
    late = make_provider(src)
    real_find = late._find_rg
    calls = {"n": 0}

    def stale_first_look(rg_id: str) -> dict[str, Any] | None:
        # The first look at the target misses it (another reconcile is creating it right now).
        calls["n"] += 1
        return None if rg_id == spec.replication_group_id and calls["n"] == 2 else real_find(rg_id)

    monkeypatch.setattr(late, "_find_rg", stale_first_look)
    info = late.ensure_target(spec)
    assert not info.created
    assert len(recorder.params("CreateReplicationGroup")) == 2  # the second was refused by AWS (moto)


def test_a_foreign_cluster_with_the_same_name_is_refused(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], admin: Any) -> None:
    src = make_source()
    spec = spec_for(src)
    admin.create_replication_group(ReplicationGroupId=spec.replication_group_id, ReplicationGroupDescription="x")
    with pytest.raises(RefusedError, match="belongs to no DurableCache migration"):
        make_provider(src).ensure_target(spec)
    other = spec_for(src, replication_group_id=unique("tgt"), migration_id="other/migration")
    make_provider(src).ensure_target(other)
    stolen = dataclasses.replace(other, migration_id="shop/sessions")
    with pytest.raises(RefusedError, match="belongs to migration 'other/migration'"):
        make_provider(src).ensure_target(stolen)


def test_adopting_a_non_durable_cluster_is_refused(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], admin: Any) -> None:
    src = make_source()
    spec = spec_for(src)
    admin.create_replication_group(ReplicationGroupId=spec.replication_group_id, ReplicationGroupDescription="x",
                                   Tags=[{"Key": OWNER_TAG, "Value": spec.migration_id}])
    with pytest.raises(RefusedError, match="created with Durability=default; durability cannot be turned on"):
        make_provider(src).ensure_target(spec)


def test_read_back_mismatch_fails(make_source: Callable[..., str], make_provider: Callable[..., AwsProvider],
                                  admin: Any) -> None:
    src = make_source()
    spec = spec_for(src)
    admin.create_replication_group(ReplicationGroupId=spec.replication_group_id, ReplicationGroupDescription="x",
                                   Durability="async", Tags=[{"Key": OWNER_TAG, "Value": spec.migration_id}])
    with pytest.raises(RefusedError, match="reports Durability=async, EffectiveDurability=async, but sync"):
        make_provider(src).wait_ready(spec)


def test_wait_is_bounded_with_exponential_backoff(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], clock: FakeClock) -> None:
    src = make_source()
    spec = spec_for(src, tags={"dc-moto/polls": "1000"})  # stays "creating" (see motoserver.py)
    provider = make_provider(src, max_delay=30.0)
    provider.ensure_target(spec)
    with pytest.raises(RefusedError, match="still creating after 100s"):
        provider.wait_ready(spec, timeout=100.0)
    assert clock.sleeps == [5.0, 10.0, 20.0, 30.0, 30.0, 5.0]
    assert clock.now == 100.0


def test_endpoints_go_through_the_resolver_seam_to_a_real_server(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider],
        make_server: Callable[..., LocalServer], tls_certs: dict[str, str]) -> None:
    """moto invents hostnames; the resolver maps them to a real TLS server with the same AUTH token,
    and the engine's own connection layer connects through it."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server (with TLS) is required: scripts/system-deps.sh installs it"
    server = make_server(binary=binary, tls=tls_certs, password=TOKEN)
    seen: list[Endpoint] = []

    def to_local(ep: Endpoint) -> Endpoint:
        seen.append(ep)
        return dataclasses.replace(ep, host="127.0.0.1", port=server.port)

    src = make_source(auth_token=TOKEN)
    provider = make_provider(src, endpoint_resolver=to_local, ca_file=tls_certs["ca"])
    spec = spec_for(src, auth_token=TOKEN)
    provider.ensure_target(spec)
    provider.wait_ready(spec)
    (endpoint,) = provider.endpoints(spec)
    assert seen[-1].host.startswith(f"clustercfg.{spec.replication_group_id}.")
    # The source's endpoint (describe_source, for preflight and the worker) goes through it too.
    assert any(ep.host.startswith(f"clustercfg.{src}.") for ep in seen[:-1])
    assert endpoint.tls and endpoint.password == TOKEN and endpoint.ca_file == tls_certs["ca"]
    assert TOKEN not in endpoint.redacted() and TOKEN not in repr(endpoint)

    async def ping() -> Any:
        conn = await Connection.open(endpoint)
        try:
            return await conn.call("PING")
        finally:
            await conn.close()

    assert asyncio.run(ping()) in (b"PONG", "PONG")


def test_set_durability_switches_sync_and_async(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], recorder: Recorder) -> None:
    src = make_source()
    spec = spec_for(src)
    provider = make_provider(src)
    provider.ensure_target(spec)
    provider.wait_ready(spec)
    info = provider.set_durability(dataclasses.replace(spec, durability="async"))
    assert (info.durability, info.effective_durability) == ("async", "async")
    (sent,) = recorder.params("ModifyReplicationGroup")
    assert (sent["Durability"], sent["ApplyImmediately"]) == ("async", True)
    assert b"Durability=async" in recorder.body("ModifyReplicationGroup")
    # Asking for what it already is sends nothing.
    provider.set_durability(dataclasses.replace(spec, durability="async"))
    assert len(recorder.params("ModifyReplicationGroup")) == 1
    with pytest.raises(UsageError, match="sync or async"):
        provider.set_durability(dataclasses.replace(spec, durability="disabled"))


def test_changed_durability_in_the_spec_is_applied_on_adopt(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], recorder: Recorder) -> None:
    src = make_source()
    spec = spec_for(src)
    provider = make_provider(src)
    provider.ensure_target(spec)
    provider.wait_ready(spec)
    provider.ensure_target(dataclasses.replace(spec, durability="async"))
    assert [p["Durability"] for p in recorder.params("ModifyReplicationGroup")] == ["async"]


def test_durability_cannot_be_switched_on_a_cluster_created_without_it(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], admin: Any) -> None:
    src = make_source()
    spec = spec_for(src)
    admin.create_replication_group(ReplicationGroupId=spec.replication_group_id, ReplicationGroupDescription="x",
                                   Tags=[{"Key": OWNER_TAG, "Value": spec.migration_id}])
    with pytest.raises(RefusedError, match="has Durability=default; it can only switch"):
        make_provider(src).set_durability(spec)


def test_quota_error_is_final_and_carries_the_aws_message(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider]) -> None:
    src = make_source()
    spec = spec_for(src, shards=50, replicas_per_shard=2)  # 150 nodes; moto server's quota is 90
    with pytest.raises(AwsQuotaExceeded) as exc:
        make_provider(src).ensure_target(spec)
    assert isinstance(exc.value, RefusedError) and not exc.value.retryable
    assert "NodeQuotaForClusterExceeded: Cannot create a cluster with 150 nodes" in str(exc.value)


def test_no_secret_in_logs(make_source: Callable[..., str], make_provider: Callable[..., AwsProvider],
                           capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(json=True, level="debug")
    try:
        src = make_source(auth_token=TOKEN)
        spec = spec_for(src, auth_token=TOKEN, write_rate_mib_s=500.0)
        provider = make_provider(src)
        provider.ensure_target(spec)
        provider.wait_ready(spec)
        provider.endpoints(spec)
    finally:
        # The configured logger writes to capsys's stream, which closes with this test.
        structlog.reset_defaults()
    err = capsys.readouterr().err
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "creating durable target" in events and "preflight warning" in events
    assert TOKEN not in err


def test_the_environment_seam_maps_a_replication_groups_hosts() -> None:
    """DURABLECACHE_TEST_ENDPOINT_MAP: how a test hands an operator process the resolver (tests/kube)."""
    from durablecache.providers.aws import resolver_from_env

    assert resolver_from_env("") is None
    resolve = resolver_from_env("src-1=127.0.0.1:7001, dst-2=127.0.0.1:7002")
    assert resolve is not None
    ep = Endpoint("clustercfg.dst-2.ab12cd.use1.cache.amazonaws.com", 6379, tls=True, password="p")
    assert resolve(ep) == dataclasses.replace(ep, host="127.0.0.1", port=7002)
    assert resolve(Endpoint("master.src-1.x.use1.cache.amazonaws.com", 6379)).port == 7001
    other = Endpoint("clustercfg.dst-22.ab12cd.use1.cache.amazonaws.com", 6379)
    assert resolve(other) == other          # a label must equal the id, not merely start with it
    with pytest.raises(UsageError, match="expected <replication-group-id>=<host>:<port>"):
        resolver_from_env("src-1=nowhere")

