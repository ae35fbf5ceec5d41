"""Prometheus metrics of every DurableCache the operator reconciles (from its status)."""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from ..phases import Phase

PHASES = tuple(p.value for p in Phase)
LABELS = ("namespace", "name")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.phase = Gauge("durablecache_phase", "1 for the phase the migration is in, 0 for the others",
                           (*LABELS, "phase"), registry=r)
        self.progress = Gauge("durablecache_copy_progress_ratio", "bulk copy progress, 0 to 1", LABELS, registry=r)
        self.keys_copied = Gauge("durablecache_keys_copied", "keys copied by the bulk copy", LABELS, registry=r)
        self.keys_total = Gauge("durablecache_keys_total", "keys found in the source when the copy started",
                                LABELS, registry=r)
        self.backlog = Gauge("durablecache_dirty_backlog", "keys written since RouteIn whose latest value is not "
                             "copied yet", LABELS, registry=r)
        self.pause = Gauge("durablecache_last_cutover_pause_milliseconds", "write pause of the last cutover "
                           "attempt", LABELS, registry=r)
        self.repair_blocked = Gauge("durablecache_repair_blocked", "1 while a verify-and-repair that would delete "
                                    "or overwrite much of a side waits for acceptance", LABELS, registry=r)
        self.side_changes = Gauge("durablecache_side_changes", "times a server of either side was found restarted, "
                                  "failed over or replaced during the migration", LABELS, registry=r)
        self.lag = Gauge("durablecache_target_durability_lag_seconds", "the async-durable target's "
                         "DurabilityLag as last read from CloudWatch (it refuses writes near 10 s)", LABELS, registry=r)
        self.write_rate = Gauge("durablecache_target_write_rate_bytes", "the rate per target primary the copy "
                                "and syncer write at, as the durability lag allows", LABELS, registry=r)
        self.proxy_clients = Gauge("durablecache_proxy_clients", "client connections open on the migration's "
                                   "proxy processes", LABELS, registry=r)
        self.proxy_connections = Gauge("durablecache_proxy_connections_accepted", "client connections the proxy "
                                       "processes accepted since they started (refused ones included)", LABELS,
                                       registry=r)
        self.proxy_refused = Gauge("durablecache_proxy_clients_refused", "client connections refused over "
                                   "spec.proxy.maxClients since the proxy processes started", LABELS, registry=r)
        self._known: set[tuple[str, str]] = set()

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def observe(self, obj: dict[str, Any]) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        self._known.add(key)
        status = obj.get("status") or {}
        current = status.get("phase")
        for phase in PHASES:
            self.phase.labels(*key, phase).set(1 if phase == current else 0)
        prog = status.get("progress") or {}
        self.progress.labels(*key).set((prog.get("percent") or 0) / 100)
        self.keys_copied.labels(*key).set(prog.get("keysCopied") or 0)
        self.keys_total.labels(*key).set(prog.get("keysTotal") or 0)
        self.backlog.labels(*key).set(status.get("dirtyBacklog") or 0)
        self.repair_blocked.labels(*key).set(1 if status.get("repairBlocked") else 0)
        self.side_changes.labels(*key).set(status.get("sideChanges") or 0)
        if status.get("lastCutoverPauseMs") is not None:
            self.pause.labels(*key).set(status["lastCutoverPauseMs"])
        clients = status.get("proxyClients")
        if clients:
            self.proxy_clients.labels(*key).set(clients.get("clients") or 0)
            self.proxy_connections.labels(*key).set(clients.get("connectionsTotal") or 0)
            self.proxy_refused.labels(*key).set(clients.get("refused") or 0)
        lag = status.get("durabilityLag") or {}
        if lag.get("seconds") is not None:
            self.lag.labels(*key).set(lag["seconds"])
        if lag.get("rateBytesPerSecond") is not None:
            self.write_rate.labels(*key).set(lag["rateBytesPerSecond"])

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key not in self._known:
            return
        self._known.discard(key)
        for phase in PHASES:
            self.phase.remove(*key, phase)
        for gauge in (self.progress, self.keys_copied, self.keys_total, self.backlog, self.repair_blocked,
                      self.side_changes):
            gauge.remove(*key)
        for optional in (self.pause, self.lag, self.write_rate, self.proxy_clients, self.proxy_connections,
                         self.proxy_refused):
            with contextlib.suppress(KeyError):
                optional.remove(*key)
