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
from ..errors import DurableCacheError, RefusedError, UsageError
from ..phases import FINAL_PHASES, OPERATOR_PHASES, Phase, phase_or_none
from ..providers import Provider
from ..readiness import source_warning
from ..topology import discover
from . import COMPONENT, FINALIZER, GROUP, PLURAL, READY_TIMEOUT, RECONCILE_INTERVAL, VERSION
from .endpoints import desired_route, restart_workloads, switch
from .kube import Kube
from .metrics import Metrics
from .runner import WorkloadRunner
from .spec import (
    TLS_CERT_KEY,
    TLS_KEY_KEY,
    DurableCacheSpec,
    SpecError,
    credentials,
    endpoint_dict,
    stored_endpoint,
    with_tls,
)
from .status import conditions_for, progress

log = logs.get("durablecache.operator")
ERROR_BACKOFF_MAX = 30.0
WORKER_BACKOFF_MAX = 60.0
# Provision looks at a target still being created this often (backing off up to the last), requeueing
# in between rather than holding a thread; the operator's --ready-timeout bounds the whole wait.
PROVISION_FIRST_LOOK = 2.0
PROVISION_LOOK_MAX = 30.0


@dataclasses.dataclass
class OperatorContext:
    kube: Kube
    runner: WorkloadRunner
    metrics: Metrics
    peering: str | None = None
    standalone: bool = False
    ready_timeout: float = READY_TIMEOUT
    interval: float = RECONCILE_INTERVAL


def _status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def _checkpoint(obj: dict[str, Any], part: str) -> dict[str, Any]:
    return (_status(obj).get("checkpoint") or {}).get(part) or {}


def _phase(obj: dict[str, Any]) -> Phase | None:
    return phase_or_none(_status(obj).get("phase"))


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
        self.next_provision_look = 0.0
        self.provision_delay = PROVISION_FIRST_LOOK

    async def get(self) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.kube.get, self.ns, self.name)

    async def patch(self, status: dict[str, Any]) -> None:
        await asyncio.to_thread(self.kube.patch_status, self.ns, self.name, status)

    async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        await asyncio.to_thread(self.kube.event, obj, type_, reason, message, COMPONENT)

    async def set_phase(self, obj: dict[str, Any], phase: Phase, message: str = "", **extra: Any) -> None:
        assert phase in OPERATOR_PHASES, "the worker sets every phase from RouteIn on"
        gen = obj["metadata"].get("generation")
        conds = conditions_for(phase, message, gen, _status(obj).get("conditions") or [])
        await self.patch({"phase": phase, "conditions": conds, "observedGeneration": gen, **extra})
        obj.setdefault("status", {}).update(phase=phase, conditions=conds)
        await self.event(obj, "Normal", phase, message or f"phase {phase}")

    async def fail(self, obj: dict[str, Any], reason: str, message: str) -> None:
        gen = obj["metadata"].get("generation")
        conds = conditions_for(Phase.FAILED, message, gen, _status(obj).get("conditions") or [], failure_reason=reason)
        await self.patch({"phase": Phase.FAILED.value, "conditions": conds, "observedGeneration": gen})
        await self.event(obj, "Warning", reason, message)
        log.warning("migration failed", namespace=self.ns, name=self.name, reason=reason, detail=message)

    # -- the loop ---------------------------------------------------------------------------------
    async def step(self) -> bool:
        """One pass; True when there is nothing left to do for this resource."""
        obj = await self.get()
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return True
        self.ctx.metrics.observe(obj)
        phase = _phase(obj)
        op = _checkpoint(obj, "operator")
        if phase == Phase.COMPLETE and _keeps_proxy(obj):
            # afterCutover proxy: the worker's proxy is the applications' endpoint for good.
            await self.ensure_worker(obj)
            await self.route(obj)
            return False
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
        if op.get("seeding") and not op.get("target"):
            await self.seed(obj, phase)
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
            phase = _phase(obj) or Phase.ROUTE_IN
            conds = conditions_for(phase, "", obj["metadata"].get("generation"), _status(obj).get("conditions") or [],
                                   degraded=("WorkerRestarted", message))
            await self.patch({"conditions": conds})
        else:
            self.worker_restarts = 0

    # -- Preflight and Provision -----------------------------------------------------------------
    async def provision(self, obj: dict[str, Any], phase: Phase | None) -> None:
        """Preflight once, then Provision one look at a time: a target still being created is looked
        at again on a later pass (with backoff), never waited for here."""
        try:
            spec = DurableCacheSpec.parse(obj)
            provider = await asyncio.to_thread(spec.make_provider, self.ctx.ready_timeout)
            _user, token = await asyncio.to_thread(credentials, self.kube, self.ns, spec.target)
            tspec = spec.target_spec(token)
            if phase != Phase.PROVISION:
                if not await self._preflight(obj, spec, provider, tspec):
                    return
                await self.set_phase(obj, Phase.PROVISION)
            if spec.seeding.mode == "snapshot":
                await self._defer_target(obj, spec, provider)
                return
            if not _checkpoint(obj, "operator").get("provisionStarted"):
                await self._start_provision(obj, provider, tspec)
            if time.monotonic() >= self.next_provision_look:
                await self._look_at_target(obj, spec, provider, tspec)
        except DurableCacheError as exc:
            await self.fail(obj, "PreflightFailed" if phase != Phase.PROVISION else "ProvisionFailed", str(exc))

    async def _preflight(self, obj: dict[str, Any], spec: DurableCacheSpec, provider: Provider,
                         tspec: Any) -> bool:
        await self.set_phase(obj, Phase.PREFLIGHT, **spec.side_names())
        result = await asyncio.to_thread(provider.preflight, tspec)
        for warning in result.warnings:
            await self.event(obj, "Warning", "PreflightWarning", str(warning))
        for ignored in spec.ignored_settings():
            await self.event(obj, "Warning", "SettingIgnored", ignored)
        clients = await self._source_clients(spec, provider)
        if clients:
            await self.event(obj, "Warning", "ClientReadiness", clients)
        if not result.ok:
            await self.fail(obj, "PreflightFailed", result.message())
            return False
        await asyncio.to_thread(self._check_proxy_tls, spec, provider)
        return True

    def _check_proxy_tls(self, spec: DurableCacheSpec, provider: Provider) -> None:
        """A TLS source needs a proxy serving TLS (spec.proxy.tls.secretName): the applications'
        endpoint must not fall back to plain TCP in the middle of a migration. The Secret must hold a
        certificate and its key. SpecError (-> PreflightFailed) otherwise."""
        secret = spec.proxy.tls_secret_name
        if secret is None:
            enabled = spec.source.tls.enabled
            if enabled is None:
                enabled = bool(provider.describe_source().transit_encryption)
            if enabled:
                raise SpecError("spec.proxy.tls.secretName", "the source uses TLS, so the proxy must serve TLS too "
                                "(the applications' endpoint keeps valkeys:// throughout): name a kubernetes.io/tls "
                                "Secret (tls.crt, tls.key; a cert-manager Certificate makes one) whose certificate "
                                "names the proxy's address")
            return
        for key in (TLS_CERT_KEY, TLS_KEY_KEY):
            try:
                self.kube.secret_value(spec.namespace, secret, key)
            except UsageError as exc:   # not found, or no such key
                raise SpecError("spec.proxy.tls.secretName", f"{exc} (a kubernetes.io/tls Secret has "
                                f"{TLS_CERT_KEY} and {TLS_KEY_KEY})") from None

    async def _source_clients(self, spec: DurableCacheSpec, provider: Provider) -> str | None:
        """Preflight's early word on the applications (readiness.source_warning): standalone-mode
        clients on a cluster-mode-disabled source that moves to a cluster-mode target. Advice only:
        a source it cannot ask (a CA bundle in a Secret, not reachable) is not looked at here; the
        proxy's own report follows in Sync."""
        if spec.source.tls.ca is not None:
            return None
        try:
            described = await asyncio.to_thread(provider.describe_source)
            user, password = await asyncio.to_thread(credentials, self.kube, self.ns, spec.source)
            source = dataclasses.replace(with_tls(described.endpoint or spec.source.first_endpoint(), spec.source.tls),
                                         username=user, password=password, iam=spec.iam_auth("source"))
            source_cluster = (await discover(source)).cluster
            target_cluster = spec.target.is_aws or await self._static_target_is_cluster(spec)
            return await source_warning(source, source_cluster=source_cluster, target_cluster=target_cluster)
        except (DurableCacheError, OSError, TimeoutError) as exc:
            log.info("source clients not read at preflight", namespace=self.ns, name=self.name, reason=str(exc)[:200])
            return None

    async def _static_target_is_cluster(self, spec: DurableCacheSpec) -> bool:
        if spec.target.tls.ca is not None or not spec.target.endpoints:
            return False
        user, password = await asyncio.to_thread(credentials, self.kube, self.ns, spec.target)
        target = dataclasses.replace(spec.target.first_endpoint(), username=user, password=password,
                                     iam=spec.iam_auth("target"))
        return (await discover(target)).cluster

    # -- snapshot seeding (docs/aws.md) --------------------------------------------------------------
    async def _defer_target(self, obj: dict[str, Any], spec: DurableCacheSpec, provider: Provider) -> None:
        """Seeding: the worker starts with the source alone, and the target is created only once RouteIn
        has passed (seed): a snapshot taken earlier would miss the writes nobody marked."""
        source_desc = await asyncio.to_thread(provider.describe_source)
        source_ep = with_tls(source_desc.endpoint or spec.source.first_endpoint(), spec.source.tls)
        await self.patch({
            **spec.side_names(),
            "endpoints": {"source": source_ep.address},
            "checkpoint": {"operator": {"provisioned": True, "seeding": True, "source": endpoint_dict(source_ep),
                                        "migrationId": spec.migration_id}},
        })
        await self.event(obj, "Normal", "SeedingDeferred", "the target is restored from a snapshot of the source "
                         "once RouteIn has passed (spec.seeding.mode snapshot)")

    async def seed(self, obj: dict[str, Any], phase: Phase | None) -> None:
        """Once the worker is past RouteIn (phase Copy: every write is marked from then on): snapshot the
        source, create the target from it with the durability override, and look at it one look at a
        time, as Provision does; its endpoint in checkpoint.operator.target is what the worker waits for.
        The phases are the worker's now, so a failure is reported to it (checkpoint.operator.seedFailed),
        which fails the migration."""
        if phase != Phase.COPY or _checkpoint(obj, "operator").get("seedFailed"):
            return
        try:
            spec = DurableCacheSpec.parse(obj)
            provider = await asyncio.to_thread(spec.make_provider, self.ctx.ready_timeout)
            _user, token = await asyncio.to_thread(credentials, self.kube, self.ns, spec.target)
            snapshot = await self._seed_snapshot(obj, spec, provider)
            tspec = dataclasses.replace(spec.target_spec(token), seed_snapshot=snapshot)
            if not _checkpoint(obj, "operator").get("provisionStarted"):
                await self._start_provision(obj, provider, tspec)
            if time.monotonic() >= self.next_provision_look:
                await self._look_at_target(obj, spec, provider, tspec, seeded=True)
        except DurableCacheError as exc:
            await self.patch({"checkpoint": {"operator": {"seedFailed": str(exc)}}})
            await self.event(obj, "Warning", "SeedingFailed", str(exc))

    async def _seed_snapshot(self, obj: dict[str, Any], spec: DurableCacheSpec, provider: Provider) -> str:
        """The snapshot the target is restored from: spec.seeding.snapshotName, else one taken now (a
        restart reuses it). Waits until it is available (bounded by the provider's snapshot timeout)."""
        taken = _checkpoint(obj, "operator").get("seedSnapshot")
        if taken:
            return str(taken)
        name = spec.seeding.snapshot_name or f"{spec.target_name()}-seed"
        await asyncio.to_thread(provider.snapshot_source, name, spec.migration_id, route_in_active=True)
        await self.patch({"checkpoint": {"operator": {"seedSnapshot": name}}})
        obj.setdefault("status", {}).setdefault("checkpoint", {}).setdefault("operator", {})["seedSnapshot"] = name
        await self.event(obj, "Normal", "SnapshotTaken", f"snapshot {name} of the source is available; restoring "
                         f"the target from it")
        return name

    async def _start_provision(self, obj: dict[str, Any], provider: Provider, tspec: Any) -> None:
        info = await asyncio.to_thread(provider.ensure_target, tspec)   # idempotent: adopts its own target
        if info.created:
            await self.event(obj, "Normal", "TargetCreated",
                             f"creating {info.replication_group_id} with durability {tspec.durability}")
        # When Provision began, in the status: a restarted operator keeps the same deadline.
        started = time.time()
        await self.patch({"checkpoint": {"operator": {"provisionStarted": started}}})
        obj.setdefault("status", {}).setdefault("checkpoint", {}).setdefault("operator", {})[
            "provisionStarted"] = started
        self.provision_delay = PROVISION_FIRST_LOOK

    async def _look_at_target(self, obj: dict[str, Any], spec: DurableCacheSpec, provider: Provider,
                              tspec: Any, *, seeded: bool = False) -> None:
        info = await asyncio.to_thread(provider.ready_now, tspec)
        if info is None:
            started = float(_checkpoint(obj, "operator").get("provisionStarted") or time.time())
            if time.time() - started > self.ctx.ready_timeout:
                raise RefusedError(f"target {tspec.replication_group_id!r} is still not ready after "
                                   f"{self.ctx.ready_timeout:.0f}s")
            self.next_provision_look = time.monotonic() + self.provision_delay
            self.provision_delay = min(self.provision_delay * 2, PROVISION_LOOK_MAX)
            return
        targets = await asyncio.to_thread(provider.endpoints, tspec)
        source_desc = await asyncio.to_thread(provider.describe_source)
        source_ep = with_tls(source_desc.endpoint or spec.source.first_endpoint(), spec.source.tls)
        target_ep = with_tls(targets[0], spec.target.tls)
        durability = (info.effective_durability or "unknown") if spec.target.is_aws else "unknown"
        await self.patch({
            "targetDurability": durability,
            **spec.side_names(),
            # Seeded, the worker runs already and owns status.progress.
            **({} if seeded else {"progress": progress(0, 0, Phase.PROVISION)}),
            "endpoints": {"source": source_ep.address, "target": target_ep.address},
            "checkpoint": {"operator": {"provisioned": True, "source": endpoint_dict(source_ep),
                                        "target": endpoint_dict(target_ep), "migrationId": spec.migration_id}},
        })
        await self.event(obj, "Normal", "TargetReady",
                         f"target {target_ep.address} ready (durability read back: {durability})")

    async def follow_durability(self, obj: dict[str, Any]) -> None:
        """spec.target.durability may move between sync and async at any time (aws)."""
        spec = DurableCacheSpec.parse(obj)
        current = _status(obj).get("targetDurability")
        wanted = spec.target.durability
        if not spec.target.is_aws or current in (None, "unknown") or current == wanted:
            return
        provider = await asyncio.to_thread(spec.make_provider, self.ctx.ready_timeout)
        try:
            info = await asyncio.to_thread(provider.set_durability, spec.target_spec())
        except DurableCacheError as exc:
            await self.event(obj, "Warning", "DurabilityChangeRefused", str(exc))
            return
        await self.patch({"targetDurability": info.effective_durability or wanted})
        await self.event(obj, "Normal", "DurabilityChanged", f"target durability is now {wanted}")

    # -- the applications' endpoint ---------------------------------------------------------------
    def address(self, obj: dict[str, Any], side: str) -> tuple[str, int, bool]:
        if side == "proxy":
            host, port = self.ctx.runner.proxy_address(obj)
            # The proxy serves TLS exactly when spec.proxy.tls names its Secret (Preflight requires it
            # for a TLS source), so the endpoint keeps valkeys:// from the source through the proxy.
            return host, port, DurableCacheSpec.parse(obj).proxy.tls_secret_name is not None
        ep = stored_endpoint(_checkpoint(obj, "operator")[side])
        return ep.host, ep.port, ep.tls

    async def route(self, obj: dict[str, Any]) -> None:
        phase = _phase(obj)
        op = _checkpoint(obj, "operator")
        if not op.get("provisioned"):
            return
        proxy_up = bool(_checkpoint(obj, "worker").get("proxiesUp"))
        after = "proxy" if _keeps_proxy(obj) else "target"
        want = desired_route(phase, _checkpoint(obj, "migration"), proxy_up, after)
        if phase == Phase.ROUTE_OUT and DurableCacheSpec.parse(obj).cutover.rollback:
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
        phase = _phase(obj)
        op = _checkpoint(obj, "operator")
        try:
            spec: DurableCacheSpec | None = DurableCacheSpec.parse(obj)
        except SpecError as exc:   # never provisioned anything: nothing to apply a policy to
            log.warning("deleted with a spec that does not parse", error=str(exc))
            spec = None
        if op.get("provisioned") and phase not in OPERATOR_PHASES:
            side = "target" if _checkpoint(obj, "migration").get("flipped") or phase == Phase.COMPLETE else "source"
            if op.get("route") not in (None, side):
                host, port, tls = self.address(obj, side)
                if await asyncio.to_thread(switch, self.kube, obj, host, port, tls):
                    await asyncio.to_thread(restart_workloads, self.kube, obj, f"endpoint -> {side}")
                await self.event(obj, "Normal", "EndpointSwitched",
                                 f"deleted mid-migration: applications now use the {side} at {host}:{port}")
        await self.ctx.runner.remove(obj)
        if spec is None:
            self.ctx.metrics.forget(self.ns, self.name)
            return
        policy = spec.deletion_policy.target
        if policy == "Delete" and op.get("provisioned") and spec.target.is_aws:
            try:
                provider = await asyncio.to_thread(spec.make_provider, self.ctx.ready_timeout)
                outcome = await asyncio.to_thread(provider.delete_target, spec.target_spec(), policy,
                                                  bool(_checkpoint(obj, "migration").get("flipped")))
                log.info("target deletion policy", outcome=outcome.action, reason=outcome.reason)
            except DurableCacheError as exc:
                log.warning("target kept", reason=str(exc))
        source_policy = spec.deletion_policy.source
        if source_policy != "Retain" and op.get("provisioned"):
            await self._apply_source_policy(obj, spec, source_policy, completed=phase == Phase.COMPLETE)
        self.ctx.metrics.forget(self.ns, self.name)

    async def _apply_source_policy(self, obj: dict[str, Any], spec: DurableCacheSpec, policy: str,
                                   completed: bool) -> None:
        """deletionPolicy.source SnapshotThenDelete / Delete (aws; the CRD refuses them otherwise)."""
        try:
            provider = await asyncio.to_thread(spec.make_provider, self.ctx.ready_timeout)
            outcome = await asyncio.to_thread(provider.delete_source, policy, spec.migration_id, completed)
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


def _keeps_proxy(obj: dict[str, Any]) -> bool:
    """spec.endpoint.afterCutover is proxy (read from the raw spec: a spec edited into something that
    does not parse must not make the applications' endpoint move)."""
    return ((obj.get("spec") or {}).get("endpoint") or {}).get("afterCutover") == "proxy"


def _plain(value: Any) -> Any:
    """kopf's Body is a live mapping view; the helpers take plain dicts."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
