"""The client readiness report: can the applications that use the proxy now use the target after
cutover? (docs/limits.md, "Client readiness").

Each proxy groups its client connections by (library, version, client host) (proxy/readiness.py);
``ReadinessWatch`` asks every proxy for its groups while the migration runs, merges them, and judges
them against the target: standalone-mode clients facing a cluster-mode target, databases other than
0 selected into a cluster-mode target, commands ElastiCache refuses. The summary is in the
migration's status (``clients``); an event (``readiness``) says when the verdict changes.

``source_warning`` gives the same warning before any proxy runs, from the source's own ``CLIENT
LIST`` (its ``lib-name``/``lib-ver`` columns; Valkey and Redis ≥ 7.2 show them), for preflight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from . import logs
from .errors import DurableCacheError
from .resp import Connection
from .urls import Endpoint

log = logs.get("durablecache.readiness")
SHOWN_GROUPS = 20          # groups listed in a status (all are counted)
NAMED_IN_MESSAGE = 5       # groups named in a warning's text
AFTER_CUTOVER_HINT = ("switch them to cluster mode, or keep the proxy in front "
                      "(spec.endpoint.afterCutover: proxy; durablecache migrate keeps proxying by default)")
Emit = Callable[[dict[str, Any]], None]


def merge(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several proxies' /clients reports as one (groups with the same key added up)."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    other = 0
    for report in reports:
        other += int(report.get("otherConnections") or 0)
        for g in report.get("groups") or []:
            key = (str(g.get("lib", "")), str(g.get("version", "")), str(g.get("address", "")))
            old = groups.get(key)
            if old is None:
                groups[key] = dict(g)
                continue
            old["mode"] = "cluster" if "cluster" in (old.get("mode"), g.get("mode")) else "standalone"
            for count in ("connections", "open"):
                old[count] = int(old.get(count) or 0) + int(g.get(count) or 0)
            for items in ("resp", "databases", "restricted"):
                old[items] = sorted(set(old.get(items) or []) | set(g.get(items) or []))
    return {"groups": [groups[k] for k in sorted(groups)], "otherConnections": other}


def describe(g: dict[str, Any]) -> str:
    """'valkey-py 6.2.0 from 10.0.0.7 (3 connections)'."""
    lib = g.get("lib") or "unnamed client"
    version = f" {g['version']}" if g.get("version") else ""
    where = f" from {g['address']}" if g.get("address") else ""
    n = int(g.get("connections") or 0)
    return f"{lib}{version}{where} ({n} connection{'s' if n != 1 else ''})"


def _named(groups: list[dict[str, Any]]) -> str:
    text = ", ".join(describe(g) for g in groups[:NAMED_IN_MESSAGE])
    more = len(groups) - NAMED_IN_MESSAGE
    return text + (f" and {more} more" if more > 0 else "")


def _count(groups: list[dict[str, Any]]) -> int:
    return sum(int(g.get("connections") or 0) for g in groups)


def assess(report: dict[str, Any], *, target_cluster: bool) -> dict[str, Any]:
    """The status summary of a merged report: counts, the groups (at most SHOWN_GROUPS) and the
    problems found, each a sentence; ``ready`` when there is none."""
    groups = list(report.get("groups") or [])
    problems: list[str] = []
    standalone = [g for g in groups if g.get("mode") != "cluster"]
    if target_cluster and standalone:
        problems.append(f"{_count(standalone)} connections from standalone-mode clients ({_named(standalone)}); "
                        f"after cutover they will reach a cluster-mode endpoint: {AFTER_CUTOVER_HINT}")
    numbered = [g for g in groups if any(int(db) > 0 for db in g.get("databases") or [])]
    if target_cluster and numbered:
        dbs = sorted({int(db) for g in numbered for db in g.get("databases") or [] if int(db) > 0})
        problems.append(f"{_count(numbered)} connections select database(s) {dbs} ({_named(numbered)}); a "
                        "cluster-mode target has only database 0 unless it is Valkey 9 with cluster-databases")
    restricted = [g for g in groups if g.get("restricted")]
    if restricted:
        names = sorted({str(c) for g in restricted for c in g.get("restricted") or []})
        problems.append(f"{_count(restricted)} connections use {', '.join(names)} ({_named(restricted)}), "
                        "which ElastiCache refuses")
    other = int(report.get("otherConnections") or 0)
    return {"ready": not problems, "connections": _count(groups) + other,
            "standaloneConnections": _count(standalone), "clusterConnections": _count(groups) - _count(standalone),
            "otherConnections": other, "groups": groups[:SHOWN_GROUPS], "problems": problems}


class ReadinessWatch:
    """Asks the proxies for their clients every ``interval`` seconds while the migration runs."""

    def __init__(self, emit: Emit, interval: float):
        self.emit = emit
        self.interval = max(0.05, interval)
        self.summary: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._said: list[str] = []
        self._looking = asyncio.Lock()   # a refresh, or a switch that wants none (quiet())

    def start(self, proxies: Sequence[Any], target_cluster: bool) -> None:
        self.stop_now()
        self._task = asyncio.create_task(self._run(list(proxies), target_cluster))

    @contextlib.asynccontextmanager
    async def quiet(self) -> AsyncIterator[None]:
        """No look while inside (a cutover's pause): a proxy's report is a pass over every one of its
        client connections, milliseconds with thousands of them, on the thread that serves them."""
        async with self._looking:
            yield

    async def refresh(self, proxies: Sequence[Any], target_cluster: bool) -> None:
        """One look at every proxy that can report (a proxy that cannot answer now is skipped)."""
        reports = []
        async with self._looking:
            for p in proxies:
                fetch = getattr(p, "clients", None)
                if fetch is None:
                    continue
                with contextlib.suppress(DurableCacheError, OSError, TimeoutError):
                    reports.append(await fetch())
        if not reports:
            return
        self.summary = assess(merge(reports), target_cluster=target_cluster)
        problems = list(self.summary["problems"])
        if problems != self._said:
            self._said = problems
            self.emit({"event": "readiness", "ready": self.summary["ready"], "problems": problems,
                       "connections": self.summary["connections"]})

    async def _run(self, proxies: list[Any], target_cluster: bool) -> None:
        while True:
            try:
                await self.refresh(proxies, target_cluster)
            except Exception as exc:  # noqa: BLE001 - a report is advice: it must never end the migration
                log.warning("readiness.refresh_failed", error=str(exc)[:200])
            await asyncio.sleep(self.interval)

    def stop_now(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- before any proxy: the source's own CLIENT LIST -------------------------------------------------
def client_list_groups(text: bytes, own_prefix: bytes = b"durablecache-") -> dict[str, Any]:
    """A server's CLIENT LIST as a report (proxy/readiness.py's form). Without cluster questions to go
    by, every client is counted standalone: on a cluster-mode-disabled source that is what they are."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for line in text.splitlines():
        fields = dict(part.split(b"=", 1) for part in line.split(b" ") if b"=" in part)
        if not fields or fields.get(b"name", b"").startswith(own_prefix):
            continue
        flags = fields.get(b"flags", b"")
        if b"S" in flags or b"M" in flags:      # replication links are not applications
            continue
        host = fields.get(b"addr", b"").rsplit(b":", 1)[0].decode(errors="replace")
        key = (fields.get(b"lib-name", b"").decode(errors="replace"),
               fields.get(b"lib-ver", b"").decode(errors="replace"), host)
        g = groups.setdefault(key, {"lib": key[0], "version": key[1], "address": host, "mode": "standalone",
                                    "connections": 0, "open": 0, "resp": [], "databases": [], "restricted": []})
        g["connections"] += 1
        g["open"] += 1
        db = int(fields.get(b"db", b"0") or 0)
        resp = int(fields.get(b"resp", b"2") or 2)
        g["databases"] = sorted(set(g["databases"]) | ({db} if db else set()))
        g["resp"] = sorted(set(g["resp"]) | {resp})
    return {"groups": [groups[k] for k in sorted(groups)], "otherConnections": 0}


async def source_warning(source: Endpoint, *, source_cluster: bool, target_cluster: bool,
                         timeout: float = 10.0) -> str | None:
    """Preflight's early word: the source's current clients, when a cluster-mode-disabled source
    moves to a cluster-mode target. None when there is nothing to say."""
    if source_cluster or not target_cluster:
        return None
    conn = await asyncio.wait_for(Connection.open(source, name="durablecache-preflight", select_db=0), timeout)
    try:
        text = await asyncio.wait_for(conn.call("CLIENT", "LIST"), timeout)
    finally:
        await conn.close()
    summary = assess(client_list_groups(bytes(text or b"")), target_cluster=True)
    if not summary["standaloneConnections"]:
        return None
    return "the source's CLIENT LIST: " + summary["problems"][0]
