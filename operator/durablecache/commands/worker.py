"""durablecache worker: the proxy and syncer of one DurableCache, run by the operator (a pod, or a local
process in tests). It runs the same protocol as ``durablecache migrate``, with its resume state kept in
the resource's status, and reports progress, phases and Events to the API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from typing import Any

import aiohttp

from .. import logs
from ..errors import DurableCacheError, UsageError
from ..k8s.kube import Kube, load_client
from ..k8s.spec import credentials, go_duration, iam_auth, make_provider, target_spec, with_credentials
from ..k8s.status import conditions_for, progress
from ..k8s.store import StatusStore
from ..migration import Phase
from . import migrate as migrate_cmd
from ._common import run_async

NAME = "worker"
HELP = "run the proxy and syncer of one DurableCache (started by the operator; not for direct use)"
log = logs.get("durablecache.worker")
WORKER_COMPONENT = "durablecache-worker"
GATE_EVENT_INTERVAL = 30.0
GATE_WARN_AFTER = 120.0     # RouteIn: applications still on the source this long is worth a Warning
# After the operator moved the applications back onto the proxy for a rollback, wait this long for
# their old connections to the target to drain before the proxies flip back to the source.
ROLLBACK_SETTLE = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resource", required=True, metavar="NAMESPACE/NAME", help="the DurableCache to run")
    p.add_argument("--listen", default="0.0.0.0:6379", metavar="HOST:PORT", help="where the proxy listens")
    p.add_argument("--proxy-mode", choices=["inprocess", "subprocess"], default="inprocess",
                   help="run the proxy in the worker's process or as a supervised child (as migrate)")
    p.add_argument("--gate-timeout", type=migrate_cmd.duration, default=3600.0, metavar="DUR",
                   help="how long RouteIn waits for applications to move onto the proxy (default 1h)")
    p.add_argument("--status-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often progress is written to the status (default 1s)")


def run(args: argparse.Namespace) -> int:
    namespace, sep, name = args.resource.partition("/")
    if not sep or not namespace or not name:
        raise UsageError(f"--resource must be NAMESPACE/NAME, not {args.resource!r}")
    phase = run_async(work(args, namespace, name))
    return 0 if phase in (Phase.COMPLETE, Phase.ROUTE_OUT, Phase.ROLLED_BACK) or phase is None else 1


async def work(args: argparse.Namespace, namespace: str, name: str) -> Phase | None:
    kube = Kube(load_client())
    obj = await asyncio.to_thread(kube.get, namespace, name)
    if obj is None:
        raise UsageError(f"DurableCache {namespace}/{name} not found")
    op = ((obj.get("status") or {}).get("checkpoint") or {}).get("operator") or {}
    if not op.get("provisioned"):
        raise UsageError(f"DurableCache {namespace}/{name} is not provisioned yet (the operator starts the "
                         "worker after Provision)")
    with tempfile.TemporaryDirectory(prefix="durablecache-worker-") as tmp:
        source, target = await asyncio.to_thread(_endpoints, kube, obj, op, tmp)
        spec = obj["spec"]
        cutover = spec.get("cutover") or {}
        route_in = spec.get("routeIn") or {}
        repair = spec.get("repair") or {}
        margs = argparse.Namespace(
            source=source.to_url(), target=target.to_url(), listen=args.listen,
            cutover=cutover.get("mode", "manual"),
            max_write_pause=go_duration(cutover.get("maxWritePause"), 0.1),
            drain_budget=go_duration(cutover["drainBudget"], 0.0) if cutover.get("drainBudget") else None,
            max_key_pause=go_duration(cutover.get("maxKeyPause"), 5.0),
            rollback_window=go_duration(cutover.get("rollbackWindow"), 1800.0),
            exit_after_cutover=False, state_file=None, proxy_mode=args.proxy_mode,
            control="127.0.0.1:0", control_token_file=os.path.join(tmp, "control-token"),
            allow_client=list(route_in.get("allowedClients") or []),
            gate_settle=go_duration(route_in.get("settlePeriod"), 30.0), gate_timeout=args.gate_timeout,
            max_ops=None, json=True,
            repair_max_share=float(repair.get("maxDestructiveShare", 0.05)),
            accept_destructive_repair=bool(repair.get("acceptDestructive", False)),
            target_lag=await asyncio.to_thread(_lag_reader, obj))
        reporter = Reporter(kube, obj, args.status_interval, margs.control_token_file)
        store = StatusStore(kube, namespace, name, on_phase=reporter.on_phase)
        reporter.store = store
        reports = asyncio.create_task(reporter.run())
        try:
            return await migrate_cmd.migrate(margs, store=store, emit=reporter.emit)
        except DurableCacheError as exc:
            # Migration.run recorded Failed in the status already; say it once more as an Event.
            await asyncio.to_thread(kube.event, obj, "Warning", "Failed", str(exc), WORKER_COMPONENT)
            raise
        finally:
            reports.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reports
            await asyncio.to_thread(store.close)
            await reporter.flush_events()


def _endpoints(kube: Kube, obj: dict[str, Any], op: dict[str, Any], tmp: str) -> tuple[Any, Any]:
    """Source and target with the credentials (and CA bundles) from the spec's Secrets."""
    ns = obj["metadata"]["namespace"]
    out = []
    for side in ("source", "target"):
        spec_side = obj["spec"][side]
        user, password = credentials(kube, ns, spec_side)
        ca_file = None
        ca_ref = (spec_side.get("tls") or {}).get("caSecretRef")
        if ca_ref:
            ca_file = os.path.join(tmp, f"{side}-ca.pem")
            with open(os.open(ca_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(kube.secret_value(ns, ca_ref["name"], ca_ref.get("key", "ca.crt")))
        out.append(with_credentials(op[side], user, password, ca_file, iam_auth(obj, side)))
    return out[0], out[1]


def _lag_reader(obj: dict[str, Any]) -> Any:
    """(aws helper's hunk) The target's DurabilityLag for laggovernor.py: aws targets only; a sync
    target reports 0, so the reader stays on across a sync<->async switch."""
    if obj["spec"]["target"].get("provider", "aws") != "aws":
        return None
    return make_provider(obj, 60.0).durability_lag_reader(target_spec(obj))


class Reporter:
    """Turns the engine's events into status fields and Events, and the spec's approval and rollback
    fields into calls on the migration's control API."""

    def __init__(self, kube: Kube, obj: dict[str, Any], interval: float, token_file: str):
        self.kube = kube
        self.obj = obj
        self.ns, self.name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        self.interval = interval
        self.token_file = token_file
        self.store: StatusStore | None = None
        self.control: str | None = None
        self.phase: str | None = None
        self.awaiting = False
        self.approved_sent = False
        self.rollback_sent = False
        self.rollback_routed_at: float | None = None
        self.last_gate_event = 0.0
        self.gate_blocked_since: float | None = None   # RouteIn: when clients were first seen on the source
        self.last_status: dict[str, Any] = {}
        self.blocked: dict[str, Any] | None = None     # the repair waiting for spec.repair.acceptDestructive
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()

    # -- from the engine (its event loop, or the status flusher thread) ---------------------------
    def _event(self, type_: str, reason: str, message: str) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (type_, reason, message))

    def on_phase(self, phase: str, state: dict[str, Any]) -> None:
        self.phase = phase
        self.awaiting = False
        if phase in ("Preflight", "Provision"):
            return  # the operator reported these; the engine only passes through them again
        if phase == "Failed":
            self._event("Warning", "Failed", state.get("message") or "the migration failed")
        else:
            self._event("Normal", phase, f"phase {phase}")

    def emit(self, e: dict[str, Any]) -> None:
        kind = e.get("event")
        log.info("engine event", **{k: v for k, v in e.items() if k != "event"}, engine_event=kind)
        if kind == "control":
            self.control = e["address"]
        elif kind == "proxies":
            self.loop.call_soon_threadsafe(self._spawn, self._patch(
                {"checkpoint": {"worker": {"proxiesUp": True, "proxies": e["addresses"]}}}))
            self._event("Normal", "ProxyReady", f"proxy listening on {', '.join(e['addresses'])}")
        elif kind == "gate_blocked":
            now = time.monotonic()
            if now - self.last_gate_event >= GATE_EVENT_INTERVAL:
                self.last_gate_event = now
                self._event(*self._gate_event(e, now),
                            f"clients still connected to the source, not through the proxy: {e.get('clients')}")
        elif kind == "awaiting_approval":
            if not self.awaiting:
                self.awaiting = True
                self._event("Normal", "AwaitingApproval", "in sync; set spec.cutover.approved=true to cut over")
                self.loop.call_soon_threadsafe(self._spawn, self._conditions())
        elif kind == "copied":
            self._event("Normal", "Copied", f"copied {e.get('keys')} keys in {e.get('seconds')}s")
        elif kind == "cutover":
            self._event("Normal", "CutoverDone", f"writes paused {e.get('pause_ms')} ms (attempt {e.get('attempt')})")
        elif kind == "cutover_aborted":
            self._event("Warning", "CutoverAborted", f"attempt {e.get('attempt')}: {e.get('reason')}; "
                        f"writes resumed after {e.get('pause_ms')} ms, staying in Sync")
        elif kind == "repair":
            if e.get("planned"):   # the pass the protocol always makes after the copy: not a fault
                self._event("Normal", "Verifying", f"verify-and-repair: {e.get('reason')}")
            else:
                self._event("Warning", "RepairRequired", f"full verify-and-repair: {e.get('reason')}")
        elif kind == "repaired":
            self._event("Normal", "Repaired", f"{e.get('keys')} differing keys re-copied, {e.get('checked')} checked")
        elif kind == "side_changed":
            role = "authoritative " if e.get("authoritative") else ""
            changes = "; ".join(e.get("changes", []))
            self._event("Warning", "SideChanged", f"the {role}{e.get('side')} changed: {changes}")
        elif kind == "repair_blocked":
            self._event("Warning", "RepairBlocked", str(e.get("message")))
        elif kind == "rolled_back":
            self._event("Normal", "RollbackDone", f"writes paused {e.get('pause_ms')} ms")

    def _gate_event(self, e: dict[str, Any], now: float) -> tuple[str, str]:
        """(type, reason) for clients seen on the source around the proxy. In RouteIn that is normal
        while applications move onto the proxy (Normal RouteInWaiting), and a Warning (RouteInBlocked)
        once it lasts GATE_WARN_AFTER; after RouteIn it is always a Warning (DirectClients)."""
        if e.get("phase") not in (None, "RouteIn"):
            return "Warning", "DirectClients"
        if self.gate_blocked_since is None:
            self.gate_blocked_since = now
        if now - self.gate_blocked_since >= GATE_WARN_AFTER:
            return "Warning", "RouteInBlocked"
        return "Normal", "RouteInWaiting"

    def _spawn(self, coro: Any) -> None:
        asyncio.ensure_future(coro)

    async def _patch(self, status: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self.kube.patch_status, self.ns, self.name, status)
        except Exception as exc:  # noqa: BLE001 - status reporting is retried on the next tick
            log.warning("status not written", error=str(exc)[:200])

    async def _conditions(self) -> None:
        phase = self.phase or (self.store.phase if self.store else None)
        if not self.store or not phase:
            return
        degraded = ("RepairBlocked", self.blocked["message"]) if self.blocked else None
        self.store.conditions = conditions_for(phase, "", self.store.generation, self.store.conditions,
                                               awaiting_approval=self.awaiting, degraded=degraded)
        await self._patch({"conditions": self.store.conditions})

    # -- periodic ---------------------------------------------------------------------------------
    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                await self.flush_events()
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    await self._tick(http)
                await asyncio.sleep(self.interval)

    async def flush_events(self) -> None:
        while not self.events.empty():
            type_, reason, message = self.events.get_nowait()
            await asyncio.to_thread(self.kube.event, self.obj, type_, reason, message, WORKER_COMPONENT)

    async def _tick(self, http: aiohttp.ClientSession) -> None:
        if not self.control:
            return
        headers = {"Authorization": f"Bearer {self._token()}"}
        base = f"http://{self.control}"
        async with http.get(f"{base}/status", headers=headers) as rsp:
            st = await rsp.json()
        self.phase = st["phase"]
        report = {"progress": progress(st.get("keysCopied") or 0, st.get("keysTotal") or 0, st["phase"]),
                  "dirtyBacklog": int(st.get("dirtyBacklog") or 0)}
        if st.get("lastCutoverPauseMs") is not None:
            report["lastCutoverPauseMs"] = st["lastCutoverPauseMs"]
        blocked = st.get("repairBlocked")
        report["repairBlocked"] = blocked["message"] if blocked else None
        report["sideChanges"] = int(st.get("sideChanges") or 0)
        report["durabilityLag"] = st.get("durabilityLag")     # laggovernor.py; None without a reader
        if (blocked or None) != self.blocked:
            self.blocked = blocked or None
            await self._conditions()
        if report != self.last_status:
            await self._patch(report)
            self.last_status = report
        obj = await asyncio.to_thread(self.kube.get, self.ns, self.name)
        if obj is None:
            return
        if self.store:
            self.store.generation = obj["metadata"].get("generation")
        cutover = obj["spec"].get("cutover") or {}
        if cutover.get("approved") and not self.approved_sent and st["phase"] in ("RouteIn", "Copy", "Sync"):
            async with http.post(f"{base}/approve", headers=headers) as rsp:
                if rsp.status == 200:
                    self.approved_sent = True
                    self._event("Normal", "CutoverApproved", "spec.cutover.approved is true: cutting over")
        if blocked and (obj["spec"].get("repair") or {}).get("acceptDestructive"):
            async with http.post(f"{base}/accept-repair", headers=headers) as rsp:
                if rsp.status == 200:
                    self._event("Warning", "RepairAccepted", "spec.repair.acceptDestructive is true: repairing")
        if cutover.get("rollback") and not self.rollback_sent and st["phase"] == "RouteOut":
            await self._maybe_rollback(http, base, headers, obj)

    async def _maybe_rollback(self, http: aiohttp.ClientSession, base: str, headers: dict[str, str],
                              obj: dict[str, Any]) -> None:
        # The operator first moves the applications back onto the proxy; only then may the proxy flip
        # back, or writes made directly on the target would be missed.
        route = (((obj.get("status") or {}).get("checkpoint") or {}).get("operator") or {}).get("route")
        if route != "proxy":
            return
        if self.rollback_routed_at is None:
            self.rollback_routed_at = time.monotonic()
        if time.monotonic() - self.rollback_routed_at < ROLLBACK_SETTLE:
            return
        async with http.post(f"{base}/rollback", headers=headers) as rsp:
            if rsp.status == 200:
                self.rollback_sent = True
                self._event("Normal", "RollbackRequested", "spec.cutover.rollback is true: moving back to the source")

    def _token(self) -> str:
        with open(self.token_file) as f:
            return f.read().strip()

