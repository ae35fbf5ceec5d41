"""The kopf handlers: thin. One daemon per DurableCache runs a level-triggered reconcile loop (read the
resource, do the next idempotent step, sleep), and a delete handler cleans up what the operator made.

Who writes what in status (so nothing is written by two parties at once):
- operator: Preflight and Provision (phase, conditions), targetDurability, endpoints,
  checkpoint.operator (provisioned endpoints, which side the applications use), Failed before the worker.
- worker: every phase from RouteIn on (with conditions), progress, dirtyBacklog, lastCutoverPauseMs,
  checkpoint.migration (the engine's resume state) and checkpoint.worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

import kopf

from .. import logs
from ..errors import DurableCacheError
from ..providers import Provider
from . import COMPONENT, FINALIZER, GROUP, PLURAL, VERSION
from .endpoints import desired_route, restart_workloads, switch
from .kube import Kube
from .metrics import Metrics
from .runner import WorkloadRunner
from .spec import (
    credentials,
    endpoint_dict,
    ignored_settings,
    make_provider,
    migration_id,
    side_names,
    static_endpoint,
    target_spec,
)
from .status import FINAL_PHASES, OPERATOR_PHASES, conditions_for, progress

log = logs.get("durablecache.operator")
RECONCILE_INTERVAL = 1.0
ERROR_BACKOFF_MAX = 30.0
WORKER_BACKOFF_MAX = 60.0


@dataclasses.dataclass
class OperatorContext:
    kube: Kube
    runner: WorkloadRunner
    metrics: Metrics
    peering: str | None = None
    standalone: bool = False
    ready_timeout: float = 3600.0
    interval: float = RECONCILE_INTERVAL


def _status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def _checkpoint(obj: dict[str, Any], part: str) -> dict[str, Any]:
    return (_status(obj).get("checkpoint") or {}).get(part) or {}


class Reconciler:
    """The reconcile loop of one DurableCache. Every step is idempotent and derives what to do from
    the resource alone, so a restarted operator simply continues."""

    def __init__(self, ctx: OperatorContext, namespace: str, name: str):
        self.ctx = ctx
        self.kube = ctx.kube
        self.ns, self.name = namespace, name
        self.route_checked = False
        self.worker_restarts = 0
        self.next_worker_start = 0.0

    async def get(self) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.kube.get, self.ns, self.name)

    async def patch(self, status: dict[str, Any]) -> None:
        await asyncio.to_thread(self.kube.patch_status, self.ns, self.name, status)

    async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        await asyncio.to_thread(self.kube.event, obj, type_, reason, message, COMPONENT)

    async def set_phase(self, obj: dict[str, Any], phase: str, message: str = "", **extra: Any) -> None:
        gen = obj["metadata"].get("generation")
        conds = conditions_for(phase, message, gen, _status(obj).get("conditions") or [])
        await self.patch({"phase": phase, "conditions": conds, "observedGeneration": gen, **extra})
        obj.setdefault("status", {}).update(phase=phase, conditions=conds)
        await self.event(obj, "Normal", phase, message or f"phase {phase}")

    async def fail(self, obj: dict[str, Any], reason: str, message: str) -> None:
        gen = obj["metadata"].get("generation")
        conds = conditions_for("Failed", message, gen, _status(obj).get("conditions") or [], failure_reason=reason)
        await self.patch({"phase": "Failed", "conditions": conds, "observedGeneration": gen})
        await self.event(obj, "Warning", reason, message)
        log.warning("migration failed", namespace=self.ns, name=self.name, reason=reason, detail=message)

    # -- the loop ---------------------------------------------------------------------------------
    async def step(self) -> bool:
        """One pass; True when there is nothing left to do for this resource."""
        obj = await self.get()
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return True
        self.ctx.metrics.observe(obj)
        phase = _status(obj).get("phase")
        op = _checkpoint(obj, "operator")
        if phase in FINAL_PHASES:
            await self.route(obj)
            if not op.get("workerRemoved"):
                await self.ctx.runner.remove(obj)
                await self.patch({"checkpoint": {"operator": {"workerRemoved": True}}})
                await self.event(obj, "Normal", "WorkerRemoved", "the proxy/syncer worker is stopped and removed")
            return True
        if not op.get("provisioned"):
            await self.provision(obj, phase)
            return False
        await self.ensure_worker(obj)
        await self.route(obj)
        await self.follow_durability(obj)
        return False

    async def ensure_worker(self, obj: dict[str, Any]) -> None:
        if time.monotonic() < self.next_worker_start:
            return
        outcome = await self.ctx.runner.ensure(obj)
        if outcome == "started":
            await self.event(obj, "Normal", "WorkerStarted", "started the proxy/syncer worker")
        elif outcome == "restarted":
            self.worker_restarts += 1
            delay = min(2.0 ** self.worker_restarts, WORKER_BACKOFF_MAX)
            self.next_worker_start = time.monotonic() + delay
            message = (f"the proxy/syncer worker had stopped; started it again (restart {self.worker_restarts}); "
                       "it resumes from status.checkpoint and re-verifies before any cutover")
            await self.event(obj, "Warning", "WorkerRestarted", message)
            phase = _status(obj).get("phase") or "RouteIn"
            conds = conditions_for(phase, "", obj["metadata"].get("generation"), _status(obj).get("conditions") or [],
                                   degraded=("WorkerRestarted", message))
            await self.patch({"conditions": conds})
        else:
            self.worker_restarts = 0

    # -- Preflight and Provision -----------------------------------------------------------------
    async def provision(self, obj: dict[str, Any], phase: str | None) -> None:
        try:
            provider = await asyncio.to_thread(make_provider, obj, self.ctx.ready_timeout)
            _user, token = await asyncio.to_thread(credentials, self.kube, self.ns, obj["spec"]["target"])
            tspec = target_spec(obj, token)
            if phase != "Provision":
                await self.set_phase(obj, "Preflight", **side_names(obj))
                result = await asyncio.to_thread(provider.preflight, tspec)
                for warning in result.warnings:
                    await self.event(obj, "Warning", "PreflightWarning", str(warning))
                for ignored in ignored_settings(obj):
                    await self.event(obj, "Warning", "SettingIgnored", ignored)
                if not result.ok:
                    await self.fail(obj, "PreflightFailed", result.message())
                    return
                await self.set_phase(obj, "Provision")
            await self._provision(obj, provider, tspec)
        except DurableCacheError as exc:
            await self.fail(obj, "PreflightFailed" if phase != "Provision" else "ProvisionFailed", str(exc))

    async def _provision(self, obj: dict[str, Any], provider: Provider, tspec: Any) -> None:
        info = await asyncio.to_thread(provider.ensure_target, tspec)
        if info.created:
            await self.event(obj, "Normal", "TargetCreated",
                             f"creating {info.replication_group_id} with durability {tspec.durability}")
        info = await asyncio.to_thread(provider.wait_ready, tspec)
        targets = await asyncio.to_thread(provider.endpoints, tspec)
        source_desc = await asyncio.to_thread(provider.describe_source)
        spec = obj["spec"]
        source_ep = source_desc.endpoint or static_endpoint(spec["source"])
        source_tls = (spec["source"].get("tls") or {}).get("enabled")
        if source_tls is not None:
            source_ep = dataclasses.replace(source_ep, tls=bool(source_tls))
        target_tls = (spec["target"].get("tls") or {}).get("enabled")
        target_ep = targets[0]
        if target_tls is not None:
            target_ep = dataclasses.replace(target_ep, tls=bool(target_tls))
        is_aws = spec["target"].get("provider", "aws") == "aws"
        durability = (info.effective_durability or "unknown") if is_aws else "unknown"
        src = endpoint_dict(source_ep, (spec["source"].get("tls") or {}).get("serverName"))
        dst = endpoint_dict(target_ep, (spec["target"].get("tls") or {}).get("serverName"))
        await self.patch({
            "targetDurability": durability,
            **side_names(obj),
            "progress": progress(0, 0, "Provision"),
            "endpoints": {"source": source_ep.address, "target": target_ep.address},
            "checkpoint": {"operator": {"provisioned": True, "source": src, "target": dst,
                                        "migrationId": migration_id(obj)}},
        })
        await self.event(obj, "Normal", "TargetReady",
                         f"target {target_ep.address} ready (durability read back: {durability})")

    async def follow_durability(self, obj: dict[str, Any]) -> None:
        """spec.target.durability may move between sync and async at any time (aws)."""
        spec, status = obj["spec"]["target"], _status(obj)
        current = status.get("targetDurability")
        if spec.get("provider", "aws") != "aws" or current in (None, "unknown") or current == spec["durability"]:
            return
        provider = await asyncio.to_thread(make_provider, obj, self.ctx.ready_timeout)
        try:
            info = await asyncio.to_thread(provider.set_durability, target_spec(obj))
        except DurableCacheError as exc:
            await self.event(obj, "Warning", "DurabilityChangeRefused", str(exc))
            return
        await self.patch({"targetDurability": info.effective_durability or spec["durability"]})
        await self.event(obj, "Normal", "DurabilityChanged", f"target durability is now {spec['durability']}")

    # -- the applications' endpoint ---------------------------------------------------------------
    def address(self, obj: dict[str, Any], side: str) -> tuple[str, int, bool]:
        if side == "proxy":
            host, port = self.ctx.runner.proxy_address(obj)
            return host, port, False
        ep = _checkpoint(obj, "operator")[side]
        return ep["host"], int(ep["port"]), bool(ep.get("tls"))

    async def route(self, obj: dict[str, Any]) -> None:
        phase = _status(obj).get("phase")
        op = _checkpoint(obj, "operator")
        if not op.get("provisioned"):
            return
        proxy_up = bool(_checkpoint(obj, "worker").get("proxiesUp"))
        want = desired_route(phase, _checkpoint(obj, "migration"), proxy_up)
        if phase == "RouteOut" and (obj["spec"].get("cutover") or {}).get("rollback"):
            want = "proxy"  # a rollback starts by moving the applications back onto the proxy
        if want is None or (want == op.get("route") and self.route_checked):
            return
        host, port, tls = self.address(obj, want)
        changed = await asyncio.to_thread(switch, self.kube, obj, host, port, tls)
        self.route_checked = True
        if not changed and want == op.get("route"):
            return
        restarted: list[str] = []
        if changed:
            restarted = await asyncio.to_thread(restart_workloads, self.kube, obj, f"endpoint -> {want}")
        endpoints = {"active": want}
        if want == "proxy":
            endpoints["proxy"] = f"{host}:{port}"
        await self.patch({"endpoints": endpoints, "checkpoint": {"operator": {"route": want}}})
        tail = f"; restarted {', '.join(restarted)}" if restarted else ""
        await self.event(obj, "Normal", "EndpointSwitched", f"applications now use the {want} at {host}:{port}{tail}")

    # -- deletion ---------------------------------------------------------------------------------
    async def cleanup(self, obj: dict[str, Any]) -> None:
        """Put the applications on the side that holds the latest writes, stop the worker, apply the
        deletion policies. The source is deleted only after a Complete migration, and only when its
        policy says so (the provider refuses otherwise, too)."""
        phase = _status(obj).get("phase")
        op = _checkpoint(obj, "operator")
        if op.get("provisioned") and phase not in OPERATOR_PHASES:
            side = "target" if _checkpoint(obj, "migration").get("flipped") or phase == "Complete" else "source"
            if op.get("route") not in (None, side):
                host, port, tls = self.address(obj, side)
                if await asyncio.to_thread(switch, self.kube, obj, host, port, tls):
                    await asyncio.to_thread(restart_workloads, self.kube, obj, f"endpoint -> {side}")
                await self.event(obj, "Normal", "EndpointSwitched",
                                 f"deleted mid-migration: applications now use the {side} at {host}:{port}")
        await self.ctx.runner.remove(obj)
        policy = (obj["spec"].get("deletionPolicy") or {}).get("target", "Retain")
        if policy == "Delete" and op.get("provisioned") and obj["spec"]["target"].get("provider", "aws") == "aws":
            try:
                provider = await asyncio.to_thread(make_provider, obj, self.ctx.ready_timeout)
                outcome = await asyncio.to_thread(provider.delete_target, target_spec(obj), policy,
                                                  bool(_checkpoint(obj, "migration").get("flipped")))
                log.info("target deletion policy", outcome=outcome.action, reason=outcome.reason)
            except DurableCacheError as exc:
                log.warning("target kept", reason=str(exc))
        source_policy = (obj["spec"].get("deletionPolicy") or {}).get("source", "Retain")
        if source_policy != "Retain" and op.get("provisioned"):
            await self._apply_source_policy(obj, source_policy, completed=phase == "Complete")
        self.ctx.metrics.forget(self.ns, self.name)

    async def _apply_source_policy(self, obj: dict[str, Any], policy: str, completed: bool) -> None:
        """deletionPolicy.source SnapshotThenDelete / Delete (aws; the CRD refuses them otherwise)."""
        try:
            provider = await asyncio.to_thread(make_provider, obj, self.ctx.ready_timeout)
            outcome = await asyncio.to_thread(provider.delete_source, policy, migration_id(obj), completed)
        except DurableCacheError as exc:
            await self.event(obj, "Warning", "SourceKept", f"deletionPolicy.source {policy} failed: {exc}")
            return
        if outcome.action == "retained":
            await self.event(obj, "Warning", "SourceKept", f"source {outcome.resource} kept: {outcome.reason}")
            return
        snapshot = f" after snapshot {outcome.snapshot}" if outcome.snapshot else ""
        await self.event(obj, "Normal", "SourceDeleted",
                         f"source {outcome.resource} deleted{snapshot} (deletionPolicy.source {policy})")


async def _pause(stopped: Any, seconds: float) -> None:
    """Sleep, but wake at once when kopf stops the daemon (deletion, shutdown, peering pause)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopped.wait(), timeout=seconds)


def build_registry(ctx: OperatorContext) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        if ctx.peering:
            settings.peering.name = ctx.peering
            settings.peering.mandatory = True
            # The chart creates a ClusterKopfPeering even when only some namespaces are watched.
            settings.peering.clusterwide = True
        settings.peering.standalone = ctx.standalone
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        # Events are posted explicitly (one per phase change and failure), not from every log line.
        settings.posting.enabled = False

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        # A custom registry has none of kopf's default login handlers: kubeconfig or the pod's token.
        return kopf.login_via_client(**kwargs)

    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=10.0)
    async def reconcile(name: str, namespace: str | None, stopped: Any, **_: Any) -> None:
        assert namespace, "DurableCache is a namespaced resource"
        rec = Reconciler(ctx, namespace, name)
        backoff = ctx.interval
        while not stopped:
            try:
                if await rec.step():
                    return
                backoff = ctx.interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried with backoff; the loop must not die
                backoff = min(backoff * 2, ERROR_BACKOFF_MAX)
                log.warning("reconcile failed; retrying", namespace=namespace, name=name, error=str(exc)[:300],
                            retry_in_s=backoff)
            await _pause(stopped, backoff)

    # (aws helper's hunk) A durability change after the migration ended: the reconcile daemon has
    # returned by then, so the change is followed here; before that, the daemon follows it.
    @kopf.on.field(GROUP, VERSION, PLURAL, field="spec.target.durability", registry=registry)
    async def durability_changed(name: str, namespace: str | None, old: Any, **_: Any) -> None:
        assert namespace, "DurableCache is a namespaced resource"
        rec = Reconciler(ctx, namespace, name)
        obj = await rec.get()
        if old is None or obj is None or _status(obj).get("phase") not in FINAL_PHASES:
            return
        await rec.follow_durability(obj)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, retries=5, backoff=5)
    async def delete(name: str, namespace: str | None, body: Any, **_: Any) -> None:
        assert namespace, "DurableCache is a namespaced resource"
        rec = Reconciler(ctx, namespace, name)
        obj = await rec.get() or _plain(body)
        await rec.cleanup(obj)

    return registry


def _plain(value: Any) -> Any:
    """kopf's Body is a live mapping view; the helpers take plain dicts."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
