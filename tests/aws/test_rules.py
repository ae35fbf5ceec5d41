"""The durability rules as pure functions: each rule, each fix, carry-over from the source."""

from __future__ import annotations

import dataclasses

import pytest

from durablecache.providers import rules
from durablecache.providers.base import OWNER_TAG, SOURCE_TAG, SourceDescription, TargetSpec

SOURCE = SourceDescription(
    replication_group_id="sessions-prod", engine="redis", engine_version="7.1", cluster_mode_enabled=True,
    shards=3, replicas_per_shard=2, node_type="cache.r6g.xlarge", transit_encryption=True,
    auth_token_enabled=False, subnet_group="private", security_group_ids=("sg-1",), kms_key_id="key-1",
    maintenance_window="sun:05:00-sun:06:00", port=6380, tags={"team": "shop", "aws:cloudformation:x": "y"},
)
GOOD = TargetSpec(replication_group_id="sessions-durable", migration_id="shop/sessions", durability="sync")


def check(spec: TargetSpec = GOOD, source: SourceDescription | None = SOURCE) -> rules.PreflightResult:
    return rules.check(rules.plan_target(spec, source), source)


def fields(result: rules.PreflightResult) -> list[str]:
    return [v.field for v in result.violations]


def test_a_good_spec_passes_and_carries_the_source_settings() -> None:
    plan = rules.plan_target(GOOD, SOURCE)
    assert check().ok
    assert (plan.node_type, plan.shards, plan.replicas_per_shard) == ("cache.r6g.xlarge", 3, 2)
    assert (plan.subnet_group, plan.security_group_ids, plan.kms_key_id) == ("private", ("sg-1",), "key-1")
    assert (plan.maintenance_window, plan.port) == ("sun:05:00-sun:06:00", 6380)
    assert plan.tags == {"team": "shop", OWNER_TAG: "shop/sessions", SOURCE_TAG: "sessions-prod"}
    assert plan.parameter_group is None  # a redis7 parameter group cannot serve Valkey 9
    assert {"node_type", "shards", "subnet_group", "kms_key_id"} <= plan.carried


def test_spec_values_override_the_source() -> None:
    spec = dataclasses.replace(GOOD, node_type="cache.m7g.large", shards=6, replicas_per_shard=1,
                               subnet_group="other", security_group_ids=("sg-9",), tags={"team": "cart"})
    plan = rules.plan_target(spec, SOURCE)
    assert (plan.node_type, plan.shards, plan.replicas_per_shard) == ("cache.m7g.large", 6, 1)
    assert (plan.subnet_group, plan.security_group_ids, plan.tags["team"]) == ("other", ("sg-9",), "cart")
    assert "node_type" not in plan.carried


def test_a_source_without_replicas_still_gets_one() -> None:
    plan = rules.plan_target(GOOD, dataclasses.replace(SOURCE, replicas_per_shard=0))
    assert plan.replicas_per_shard == 1


@pytest.mark.parametrize("version", ["8.1", "7.2", "8", "9.x", ""])
def test_valkey_older_than_9_or_unparsable_is_refused(version: str) -> None:
    result = check(dataclasses.replace(GOOD, engine_version=version))
    assert fields(result) == ["target.engineVersion"]
    assert "9.0 or later" in result.violations[0].fix


@pytest.mark.parametrize("version", ["9.0", "9", "9.1", "10.0.2"])
def test_valkey_9_and_later_pass(version: str) -> None:
    assert check(dataclasses.replace(GOOD, engine_version=version)).ok


def test_a_redis_or_old_valkey_source_is_fine() -> None:
    assert check(source=dataclasses.replace(SOURCE, engine="valkey", engine_version="7.2")).ok
    assert check(source=dataclasses.replace(SOURCE, engine="redis", engine_version="6.2")).ok


def test_redis_engine_for_the_target_is_refused() -> None:
    assert fields(check(dataclasses.replace(GOOD, engine="redis"))) == ["target.engine"]


@pytest.mark.parametrize("family", rules.DURABLE_FAMILIES)
def test_durable_families_pass(family: str) -> None:
    assert check(dataclasses.replace(GOOD, node_type=f"cache.{family}.large")).ok


@pytest.mark.parametrize(("node_type", "suggested"), [
    ("cache.t4g.medium", "cache.r7g.large"),
    ("cache.m5.2xlarge", "cache.r7g.2xlarge"),
    ("cache.r6gd.xlarge", "cache.r7g.xlarge"),
    ("r7g.large", "cache.r7g.large"),
])
def test_other_node_families_are_refused_with_a_suggestion(node_type: str, suggested: str) -> None:
    result = check(dataclasses.replace(GOOD, node_type=node_type))
    assert fields(result) == ["target.nodeType"]
    assert result.violations[0].fix == f"set nodeType to {suggested}"


def test_a_carried_node_type_says_where_it_came_from() -> None:
    result = check(source=dataclasses.replace(SOURCE, node_type="cache.t3.small"))
    assert "(carried from the source)" in result.violations[0].problem


def test_unknown_node_type_is_a_violation() -> None:
    result = check(source=dataclasses.replace(SOURCE, node_type=None))
    assert fields(result) == ["target.nodeType"]
    assert "cache.r7g.large" in result.violations[0].fix


def test_cluster_mode_multi_az_replicas_tls_serverless_each_refused() -> None:
    spec = dataclasses.replace(GOOD, cluster_mode_enabled=False, multi_az=False, replicas_per_shard=0,
                               transit_encryption=False, serverless=True)
    assert fields(check(spec)) == ["target.clusterMode", "target.multiAZ", "target.replicasPerShard",
                                   "target.transitEncryption", "target.serverless"]


def test_every_violation_is_listed_at_once_each_with_a_fix() -> None:
    spec = dataclasses.replace(GOOD, replication_group_id="bad--id", durability="default", engine_version="8.0",
                               node_type="cache.t4g.micro", shards=0, replicas_per_shard=6)
    result = check(spec)
    assert fields(result) == ["target.replicationGroupId", "target.durability", "target.engineVersion",
                              "target.nodeType", "target.replicasPerShard", "target.shards"]
    assert all(v.fix for v in result.violations)
    assert "'default' resolves to disabled" in result.violations[1].problem
    assert result.message().count("\n  - ") == 6


@pytest.mark.parametrize("rg_id", ["1abc", "a" * 41, "ends-", "has_underscore", "", "a--b"])
def test_invalid_target_ids(rg_id: str) -> None:
    assert fields(check(dataclasses.replace(GOOD, replication_group_id=rg_id))) == ["target.replicationGroupId"]


def test_target_id_equal_to_source_is_refused() -> None:
    result = check(dataclasses.replace(GOOD, replication_group_id="Sessions-Prod"))
    assert fields(result) == ["target.replicationGroupId"]
    assert "sessions-prod-durable" in result.violations[0].fix


def test_auth_token_rules_never_echo_the_token() -> None:
    bad = "short/tok@n"
    result = check(dataclasses.replace(GOOD, auth_token=bad))
    assert fields(result) == ["target.authSecretRef"]
    assert bad not in str(result.violations[0]) and bad not in result.message()
    assert check(dataclasses.replace(GOOD, auth_token="a-valid-token-0123456789")).ok


def test_a_source_with_auth_needs_auth_on_the_target() -> None:
    source = dataclasses.replace(SOURCE, auth_token_enabled=True)
    assert fields(check(source=source)) == ["target.authSecretRef"]
    assert check(dataclasses.replace(GOOD, auth_token="a-valid-token-0123456789"), source).ok
    with_groups = dataclasses.replace(SOURCE, user_group_ids=("ug-1",))
    assert rules.plan_target(GOOD, with_groups).user_group_ids == ("ug-1",)
    assert check(source=with_groups).ok


def test_token_and_user_groups_together_are_refused() -> None:
    spec = dataclasses.replace(GOOD, auth_token="a-valid-token-0123456789", user_group_ids=("ug-1",))
    assert fields(check(spec)) == ["target.userGroupIds"]


def test_write_rate_warning_suggests_shards() -> None:
    assert check(dataclasses.replace(GOOD, write_rate_mib_s=200.0)).warnings == ()  # 67 MiB/s per shard
    result = check(dataclasses.replace(GOOD, write_rate_mib_s=400.0))  # 133 MiB/s per shard
    assert result.ok and [w.field for w in result.warnings] == ["target.shards"]
    assert "133 MiB/s per shard" in result.warnings[0].message
    assert result.warnings[0].suggestion == "use at least 5 shards"
    assert rules.suggest_shards(400.0) == 5 and rules.suggest_shards(1.0) == 1
    with_them = dataclasses.replace(GOOD, shards=5, write_rate_mib_s=400.0)
    assert check(with_them).warnings == ()


def test_cluster_mode_disabled_source_warns_about_databases() -> None:
    result = check(source=dataclasses.replace(SOURCE, cluster_mode_enabled=False, shards=1))
    assert result.ok and [w.field for w in result.warnings] == ["source"]


def test_bad_migration_id_is_refused() -> None:
    assert fields(check(dataclasses.replace(GOOD, migration_id="a{b}"))) == ["migration id"]
