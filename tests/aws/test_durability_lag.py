"""Durability lag (item 8 of issue 19): an async-durable target refuses writes as its DurabilityLag
approaches 10 s, so the copy and the syncer slow down before that (laggovernor.py), reading the metric
from CloudWatch (providers/awslag.py; moto serves CloudWatch, the test publishes the datapoints)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from awstest import REGION

from durablecache.laggovernor import FLOOR_AT, FLOOR_SHARE, SLOW_FROM, LagGovernor, rate_for_lag
from durablecache.providers.aws import AwsProvider
from durablecache.providers.base import TargetSpec
from durablecache.ratelimit import TokenBucket

FULL = 80.0 * (1 << 20)


def test_the_rate_falls_at_once_and_rises_by_steps() -> None:
    assert rate_for_lag(FULL, FULL, 0.0) == FULL
    assert rate_for_lag(FULL, FULL, SLOW_FROM) == FULL
    half = rate_for_lag(FULL, FULL, (SLOW_FROM + FLOOR_AT) / 2)
    assert half == pytest.approx(FULL / 2)
    assert rate_for_lag(FULL, FULL, FLOOR_AT) == pytest.approx(FULL * FLOOR_SHARE)
    assert rate_for_lag(FULL, FULL, 60.0) == pytest.approx(FULL * FLOOR_SHARE)   # never zero
    assert rate_for_lag(FULL, half, None) == half                                 # no reading: as is
    floor = FULL * FLOOR_SHARE
    rises = [floor]
    while rises[-1] < FULL and len(rises) < 50:
        rises.append(rate_for_lag(FULL, rises[-1], 0.0))
    assert rises[-1] == FULL and len(rises) > 5     # back up in steps, not in one jump
    assert all(b / a <= 1.5 + 1e-9 for a, b in zip(rises, rises[1:]))


def test_the_governor_sets_every_bucket_and_reports() -> None:
    lags: list[float | None] = [0.5, 5.0, 9.0, None, 1.0]
    events: list[dict[str, Any]] = []
    buckets = [TokenBucket(FULL), TokenBucket(FULL)]

    async def run() -> list[float]:
        gov = LagGovernor(lambda: lags.pop(0), buckets, FULL, events.append, interval=0.01)
        seen = []
        for _ in range(5):
            await gov.step()
            assert {b.rate for b in buckets} == {gov.now.rate}
            seen.append(gov.now.rate)
        assert gov.status()["rateBytesPerSecond"] == round(seen[-1])
        return seen

    seen = asyncio.run(run())
    assert seen[0] == FULL and seen[1] < FULL and seen[2] == pytest.approx(FULL * FLOOR_SHARE)
    assert seen[3] == seen[2]                      # no datapoint: kept
    assert seen[2] < seen[4] <= seen[2] * 1.5      # rising again, by one step
    assert [e["lag_s"] for e in events] == [0.5, 5.0, 9.0, None, 1.0]   # every change of reading
    assert all(e["event"] == "durability_lag" and "rate_bytes_per_s" in e for e in events)


def test_a_failed_reading_keeps_the_rate() -> None:
    def broken() -> float:
        raise RuntimeError("CloudWatch unavailable")

    async def run() -> float:
        gov = LagGovernor(broken, [TokenBucket(FULL)], FULL, interval=0.01)
        return (await gov.step()).rate

    assert asyncio.run(run()) == FULL


@pytest.fixture
def cloudwatch(moto_url: str) -> Any:
    return boto3.client("cloudwatch", endpoint_url=moto_url, region_name=REGION)


def _publish(cloudwatch: Any, member: str, values_ms: list[float], at: datetime.datetime) -> None:
    """Datapoints one minute apart, the last at ``at``, as ElastiCache publishes them per node."""
    n = len(values_ms)
    cloudwatch.put_metric_data(Namespace="AWS/ElastiCache", MetricData=[
        {"MetricName": "DurabilityLag", "Unit": "Milliseconds", "Value": v,
         "Timestamp": at - datetime.timedelta(minutes=n - 1 - i),
         "Dimensions": [{"Name": "CacheClusterId", "Value": member}, {"Name": "CacheNodeId", "Value": "0001"}]}
        for i, v in enumerate(values_ms)])


def test_the_aws_provider_reads_the_targets_largest_latest_lag(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], admin: Any,
        cloudwatch: Any) -> None:
    target = make_source(shards=2, replicas=1)
    other = make_source(shards=1, replicas=1)
    members = admin.describe_replication_groups(ReplicationGroupId=target)["ReplicationGroups"][0]["MemberClusters"]
    provider = make_provider(make_source(), cloudwatch=cloudwatch)
    reader = provider.durability_lag_reader(TargetSpec(replication_group_id=target, migration_id="m",
                                                       durability="async"))
    assert reader() is None                          # nothing published yet
    now = datetime.datetime.now(datetime.UTC).replace(second=0, microsecond=0)
    _publish(cloudwatch, members[0], [9000.0, 1500.0], now)      # was high, is low now: the latest counts
    _publish(cloudwatch, members[1], [200.0, 4200.0], now)
    other_member = admin.describe_replication_groups(ReplicationGroupId=other)["ReplicationGroups"][0]
    _publish(cloudwatch, other_member["MemberClusters"][0], [9999.0], now)    # another cluster: ignored
    reader._found_at = None      # rediscover now (the 10-minute cache would otherwise hold the empty list)
    assert reader() == pytest.approx(4.2)


def test_the_migration_copies_slower_while_the_target_lags_and_speeds_up_after(make_server: Any) -> None:
    """Real servers, the lag from a reader the test controls: at 8 s the copy's target buckets drop to the
    floor (status and events say so, and the copy's pace follows: 400 KB at the floor takes seconds);
    when the lag falls the rate climbs back to the full rate and the copy finishes."""
    from durablecache.migration import Migration, MigrationOptions
    from durablecache.proxyhandles import local_proxies
    from durablecache.testing.waiting import wait_for_async

    source, target = make_server(engine="valkey8"), make_server(engine="valkey9")
    client = source.client()
    client.mset({f"k{i}": "x" * 2000 for i in range(200)})    # 400 KB
    client.close()
    full = 1 << 20        # 1 MiB/s per primary; the floor is 2 % of it, about 21 KB/s
    lag = {"s": 8.0}
    events: list[dict[str, Any]] = []
    opts = MigrationOptions(gate_settle=0.2, gate_timeout=30, copy_concurrency=2, max_target_bytes=full,
                            target_lag=lambda: lag["s"], lag_interval=0.05)

    async def run() -> dict[str, Any]:
        slowed, copied = asyncio.Event(), asyncio.Event()

        def emit(e: dict[str, Any]) -> None:
            events.append(e)
            if e["event"] == "durability_lag" and e["rate_bytes_per_s"] < full:
                slowed.set()
            if e["event"] == "copied":
                copied.set()

        m = Migration(source.endpoint(), target.endpoint(), opts, local_proxies("127.0.0.1", 0), emit=emit)
        task = asyncio.create_task(m.run())
        try:
            await asyncio.wait_for(slowed.wait(), 30)
            await wait_for_async("the copy's rate at the floor", lambda: (m.status()["durabilityLag"] or {}).get(
                "rateBytesPerSecond", full) <= full * FLOOR_SHARE + 1, 30)
            at_floor = m.status()
            # At the floor the copy cannot have finished: 400 KB at ~21 KB/s is many seconds.
            await asyncio.sleep(0.5)
            assert not copied.is_set()
            lag["s"] = 0.5
            await asyncio.wait_for(copied.wait(), 60)
            return at_floor
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    at_floor = asyncio.run(asyncio.wait_for(run(), 90))
    assert at_floor["durabilityLag"]["seconds"] == 8.0
    assert at_floor["durabilityLag"]["rateBytesPerSecond"] == round(full * FLOOR_SHARE)
    rates = [e["rate_bytes_per_s"] for e in events if e["event"] == "durability_lag"]
    floor_at = rates.index(round(full * FLOOR_SHARE))
    assert rates[-1] == full and all(a <= b for a, b in zip(rates[floor_at:], rates[floor_at + 1:]))
    assert target.client().dbsize() >= 200


def test_the_lag_and_the_rate_are_metrics() -> None:
    from durablecache.k8s.metrics import Metrics

    m = Metrics()
    obj = {"metadata": {"namespace": "shop", "name": "sessions"},
           "status": {"phase": "Copy", "durabilityLag": {"seconds": 4.5, "rateBytesPerSecond": 1000,
                                                         "fullRateBytesPerSecond": 80}}}
    m.observe(obj)
    labels = {"namespace": "shop", "name": "sessions"}
    assert m.registry.get_sample_value("durablecache_target_durability_lag_seconds", labels) == 4.5
    assert m.registry.get_sample_value("durablecache_target_write_rate_bytes", labels) == 1000
    m.forget("shop", "sessions")
    assert m.registry.get_sample_value("durablecache_target_durability_lag_seconds", labels) is None
