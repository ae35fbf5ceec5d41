"""The target's DurabilityLag from CloudWatch, for laggovernor.LagGovernor (the engine's side).

ElastiCache publishes ``DurabilityLag`` (namespace ``AWS/ElastiCache``, milliseconds, once a minute)
for every node of a durable cluster, with the node's cache cluster (``CacheClusterId``, e.g.
``<replication-group>-0001-001``) among its dimensions (AWS ElastiCache developer guide, "Durability >
Monitoring" and "Monitoring use with CloudWatch Metrics"). Which other dimensions come with it is
found out with ListMetrics instead of assumed, because GetMetricData matches dimension sets exactly.
The reading is the largest latest value over the replication group's nodes: one primary near the
limit is enough for it to refuse writes.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from .. import logs

NAMESPACE = "AWS/ElastiCache"
METRIC = "DurabilityLag"
LOOKBACK = datetime.timedelta(minutes=5)   # CloudWatch publishes per minute, a little late
PERIOD = 60
REDISCOVER_AFTER = 600.0   # seconds: nodes added by a scale-out show up within this

log = logs.get("durablecache.providers.awslag")


class DurabilityLagReader:
    """``reader()`` -> seconds of lag (the largest over the nodes), or None when nothing was published."""

    def __init__(self, cloudwatch: Any, members: Callable[[], list[str]], *,
                 now: Callable[[], datetime.datetime] | None = None, monotonic: Callable[[], float] | None = None):
        import time

        self.cloudwatch = cloudwatch
        self.members = members
        self.now = now or (lambda: datetime.datetime.now(datetime.UTC))
        self.monotonic = monotonic or time.monotonic
        self._metrics: list[dict[str, Any]] = []
        self._found_at: float | None = None

    def __call__(self) -> float | None:
        metrics = self._discover()
        if not metrics:
            return None
        end = self.now()
        queries = [{"Id": f"m{i}", "MetricStat": {"Metric": m, "Period": PERIOD, "Stat": "Maximum"},
                    "ReturnData": True} for i, m in enumerate(metrics)]
        latest: list[float] = []
        for start in range(0, len(queries), 500):   # GetMetricData takes at most 500 queries
            reply = self.cloudwatch.get_metric_data(MetricDataQueries=queries[start:start + 500],
                                                    StartTime=end - LOOKBACK, EndTime=end,
                                                    ScanBy="TimestampDescending")
            for result in reply.get("MetricDataResults", []):
                values = result.get("Values") or []
                if values:
                    latest.append(float(values[0]))   # newest first (ScanBy)
        return max(latest) / 1000.0 if latest else None

    def _discover(self) -> list[dict[str, Any]]:
        now = self.monotonic()
        if self._found_at is not None and now - self._found_at < REDISCOVER_AFTER and self._metrics:
            return self._metrics
        members = set(self.members())
        found: list[dict[str, Any]] = []
        paginator = self.cloudwatch.get_paginator("list_metrics")
        for page in paginator.paginate(Namespace=NAMESPACE, MetricName=METRIC,
                                       Dimensions=[{"Name": "CacheClusterId"}]):
            for metric in page.get("Metrics", []):
                dims = {d["Name"]: d["Value"] for d in metric.get("Dimensions", [])}
                if dims.get("CacheClusterId") in members:
                    found.append({"Namespace": NAMESPACE, "MetricName": METRIC,
                                  "Dimensions": metric["Dimensions"]})
        self._metrics, self._found_at = found, now
        log.info("durability lag metrics found", nodes=len(found))
        return found
