"""SOURCE and TARGET in `kubectl get dcache` come from status.sourceName/targetName, which the operator
fills for both providers (the spec's replicationGroupId is unset for static endpoints)."""

from __future__ import annotations

from durablecache.k8s.spec import DurableCacheSpec


def side_names(obj: dict) -> dict[str, str]:
    return DurableCacheSpec.parse(obj).side_names()


def manifest(source: dict, target: dict) -> dict:
    return {"metadata": {"name": "sessions", "namespace": "shop"},
            "spec": {"source": source, "target": target, "endpoint": {"secretName": "s"}}}


def test_static_sides_are_named_by_their_first_endpoint() -> None:
    obj = manifest({"endpoints": [{"host": "valkey-old.shop.svc", "port": 6379}]},
                   {"provider": "static", "durability": "async",
                    "endpoints": [{"host": "valkey-new-0.shop.svc", "port": 6379},
                                  {"host": "valkey-new-1.shop.svc", "port": 6380},
                                  {"host": "valkey-new-2.shop.svc", "port": 6381}]})
    assert side_names(obj) == {"sourceName": "valkey-old.shop.svc:6379", "targetName": "valkey-new-0.shop.svc:6379 +2"}


def test_aws_sides_are_named_by_replication_group() -> None:
    obj = manifest({"replicationGroupId": "sessions-prod"},
                   {"provider": "aws", "durability": "sync", "replicationGroupId": "sessions-durable"})
    assert side_names(obj) == {"sourceName": "sessions-prod", "targetName": "sessions-durable"}
    # Without a target ID the aws provider creates the group under the resource's name.
    del obj["spec"]["target"]["replicationGroupId"]
    assert side_names(obj)["targetName"] == "sessions"
