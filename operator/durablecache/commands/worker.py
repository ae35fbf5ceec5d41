"""durablecache worker: the coordinator (syncer, phases, cutover) of one DurableCache, run by the operator
(a pod, or a local process in tests). Under the operator it runs no proxy of its own (``--proxies 0``):
the proxy pods join it at ``--coordinator-listen`` (fleet.py, docs/ha.md#in-kubernetes), and it reports
them in status.proxies. It runs the same Migration as ``durablecache migrate``, in-process, with settings
from the parsed spec (k8s/spec.py), its resume state kept in the resource's status (k8s/store.py, the
worker's one status writer), and reports progress, phases and Events to the API.

It is the migration's coordinator, a singleton: before it does anything it takes the DurableCache's
coordinator Lease (k8s/lease.py) and runs with that lease's epoch; a second worker waits as a standby.
A worker that cannot renew the lease stops the migration before the lease can expire and exits
non-zero, so Kubernetes restarts it as a contender."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit

from .. import fleettls, logs
from ..errors import ConnectError, DurableCacheError, UsageError
from ..fleet import Fleet
from ..k8s.kube import Kube, load_client
from ..k8s.lease import (
    DEFAULT_DURATION,
    DEFAULT_RENEW_DEADLINE,
    DEFAULT_RETRY_PERIOD,
    CoordinatorLease,
    LeaseLost,
    LeaseTimings,
    holder_identity,
)
from ..k8s.spec import TLS_CERT_KEY, TLS_KEY_KEY, DurableCacheSpec, ProxySpec, credentials, stored_endpoint
from ..k8s.status import progress
from ..k8s.store import StatusStore
from ..migration import Emit, Migration, ProxyStarter, SeededTarget, SeedTarget
from ..options import OPERATOR_GATE_TIMEOUT, format_duration
from ..phases import SUCCESSFUL_ENDS, Phase
from ..proxyhandles import local_proxies, subprocess_proxies
from ..proxyprocesses import cpu_count
from ..urls import Endpoint
from . import migrate as migrate_cmd
from ._common import hostport, read_token, run_async
from .proxy import announce_address, server_tls

NAME = "worker"
HELP = "run the coordinator of one DurableCache (started by the operator; not for direct use)"
log = logs.get("durablecache.worker")
WORKER_COMPONENT = "durablecache-worker"
GATE_EVENT_INTERVAL = 30.0
GATE_WARN_AFTER = 120.0     # RouteIn: applications still on the source this long is worth a Warning
# After the operator moved the applications back onto the proxy for a rollback, wait this long for
# their old connections to the target to drain before the proxies flip back to the source.
ROLLBACK_SETTLE = 2.0
# A coordinator that lost its lease waits at most this long for the migration and its proxies to stop.
STOP_AFTER_LOSS_TIMEOUT = 30.0
# Seeding: how often the worker reads the resource while the operator snapshots the source and restores
# the target, and for how long at most (the operator's own bounds are the snapshot's and the target's
# readiness timeouts, an hour each; a failure it reports ends the wait at once).
SEED_POLL = 1.0
SEED_WAIT_LIMIT = 2 * 3600.0 + 600.0
LEASE_ENV = {"duration": "DURABLECACHE_LEASE_DURATION", "renew_deadline": "DURABLECACHE_LEASE_RENEW_DEADLINE",
             "retry_period": "DURABLECACHE_LEASE_RETRY_PERIOD"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resource", required=True, metavar="NAMESPACE/NAME", help="the DurableCache to run")
    p.add_argument("--listen", default="0.0.0.0:6379", metavar="HOST:PORT", help="where the proxy listens")
    p.add_argument("--proxy-mode", choices=["inprocess", "subprocess"], default="inprocess",
                   help="run the proxy in the worker's process or as a supervised child (as migrate)")
    p.add_argument("--proxies", type=int, choices=[0, 1], default=1,
                   help="1 (default): the worker runs the proxies spec.proxy asks for itself, at --listen; 0: only "
                        "proxies that join --coordinator-listen (the operator's proxy Deployment; docs/ha.md)")
    p.add_argument("--coordinator-listen", metavar="HOST:PORT",
                   help="accept proxies started elsewhere (`durablecache proxy --join`) on this address (needs "
                        "--join-token-file)")
    p.add_argument("--join-token-file", metavar="PATH",
                   help="the fleet's shared token (the mounted join-token Secret): joining proxies present it, and "
                        "it is their admin API's token")
    fleettls.add_arguments(p, "the joins and marks of --coordinator-listen, and the proxies' admin APIs")
    p.add_argument("--gate-timeout", type=migrate_cmd.duration, default=OPERATOR_GATE_TIMEOUT, metavar="DUR",
                   help="how long RouteIn waits for applications to move onto the proxy "
                        f"(default {format_duration(OPERATOR_GATE_TIMEOUT)})")
    p.add_argument("--status-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often progress is written to the status (default 1s)")
    # Defaults from the environment too (read when the worker starts): the operator starts workers with
    # fixed arguments, and tests shorten the timings through its environment.
    p.add_argument("--lease-duration", type=int, metavar="SECONDS",
                   help="the coordinator Lease's duration: a standby takes over after seeing it unrenewed this "
                        f"long (default ${LEASE_ENV['duration']} or {DEFAULT_DURATION}s)")
    p.add_argument("--lease-renew-deadline", type=float, metavar="SECONDS",
                   help="stop acting when the lease was not renewed for this long; less than the duration "
                        f"(default ${LEASE_ENV['renew_deadline']} or {DEFAULT_RENEW_DEADLINE:g}s)")
    p.add_argument("--lease-retry-period", type=float, metavar="SECONDS",
                   help="between renewals and a standby's looks "
                        f"(default ${LEASE_ENV['retry_period']} or {DEFAULT_RETRY_PERIOD:g}s)")
    p.add_argument("--announce", metavar="HOST[:PORT]",
                   help="the host the proxies name in CLUSTER SLOTS/SHARDS/NODES (the runner passes the proxy "
                        "Service's DNS name unless spec.proxy.announceHost is set)")
    p.add_argument("--tls-cert", help="the proxies serve TLS with this certificate (the mounted "
                                      "spec.proxy.tls Secret); default: read that Secret from the API")
    p.add_argument("--tls-key", help="private key of --tls-cert")


def run(args: argparse.Namespace) -> int:
    namespace, sep, name = args.resource.partition("/")
    if not sep or not namespace or not name:
        raise UsageError(f"--resource must be NAMESPACE/NAME, not {args.resource!r}")
    check_fleet_tls(args)
    phase = run_async(work(args, namespace, name))
    return 0 if phase in SUCCESSFUL_ENDS or phase is None else 1


async def _get(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    obj = await asyncio.to_thread(kube.get, namespace, name)
    if obj is None:
        raise UsageError(f"DurableCache {namespace}/{name} not found")
    return obj


def _timings(args: argparse.Namespace) -> LeaseTimings:
    """The lease timings: the flags, else the environment, else the defaults."""
    given = {"duration": args.lease_duration, "renew_deadline": args.lease_renew_deadline,
             "retry_period": args.lease_retry_period}
    values: dict[str, Any] = {}
    try:
        for field, value in given.items():
            env = os.environ.get(LEASE_ENV[field])
            if value is None and env:
                value = int(env) if field == "duration" else float(env)
            if value is not None:
                values[field] = value
        timings = LeaseTimings(**values)
        timings.check()
    except ValueError as exc:
        raise UsageError(f"coordinator lease timings: {exc}") from None
    return timings


async def work(args: argparse.Namespace, namespace: str, name: str) -> Phase | None:
    kube = Kube(load_client())
    obj = await _get(kube, namespace, name)
    if not ((obj.get("status") or {}).get("checkpoint") or {}).get("operator", {}).get("provisioned"):
        raise UsageError(f"DurableCache {namespace}/{name} is not provisioned yet (the operator starts the "
                         "worker after Provision)")
    # Its own API client: renewals never wait behind the status writer's requests.
    lease = CoordinatorLease(load_client(), obj, holder_identity(), _timings(args))
    floor = int(((obj.get("status") or {}).get("coordinator") or {}).get("epoch") or 0)
    epoch = await asyncio.to_thread(lease.acquire, floor)
    try:
        return await _coordinate(args, kube, lease, await _get(kube, namespace, name), epoch)
    finally:
        await asyncio.to_thread(lease.release)


async def _coordinate(args: argparse.Namespace, kube: Kube, lease: CoordinatorLease, obj: dict[str, Any],
                      epoch: int) -> Phase | None:
    """The migration, run while this worker holds the lease; read fresh once the lease was taken (the
    previous coordinator may have moved on while this one waited)."""
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    op = ((obj.get("status") or {}).get("checkpoint") or {}).get("operator") or {}
    spec = DurableCacheSpec.parse(obj)
    opts = dataclasses.replace(spec.migration_options(gate_timeout=args.gate_timeout),
                               target_lag=await asyncio.to_thread(_lag_reader, spec), epoch=epoch)
    host, port = hostport(args.listen, "--listen")
    with tempfile.TemporaryDirectory(prefix="durablecache-worker-") as tmp:
        source, target = await asyncio.to_thread(_endpoints, kube, spec, op, tmp)
        seed_target = _seed_target(kube, spec, namespace, name, tmp) if op.get("seeding") else None
        reporter = Reporter(kube, obj, args.status_interval)
        store = StatusStore(kube, namespace, name, on_phase=reporter.on_phase, fence=lease.valid)
        reporter.store = store
        await asyncio.to_thread(store.set_coordinator, lease.holder, epoch)
        reporter.post("Normal", "CoordinatorElected", f"{lease.holder} holds the coordinator lease, epoch {epoch}")
        fleet = coordinator_fleet(args, epoch, reporter.emit)
        reporter.fleet = fleet
        reporter.fleet_only = not args.proxies
        own: ProxyStarter | None = None
        owned: list[Any] = []
        if args.proxies:
            cert, key = await asyncio.to_thread(proxy_tls_files, kube, spec, args, tmp)
            own, owned = proxy_starter(spec.proxy, args, host, port, cert, key, reporter.emit, epoch=epoch)
        m = Migration(source, target, opts, migrate_cmd.with_fleet(own, fleet), emit=reporter.emit, store=store,
                      seed_target=seed_target)
        reporter.migration = m
        reports = asyncio.create_task(reporter.run())
        try:
            return await _drive_while_held(m, owned, lease)
        except LeaseLost as exc:
            reporter.post("Warning", "CoordinatorLeaseLost", f"{lease.holder} (epoch {epoch}) stopped: {exc}")
            raise
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


async def _watch_deadline(lease: CoordinatorLease) -> None:
    """Returns once the lease is no longer valid (its renew deadline passed, or it was taken)."""
    while lease.valid():
        await asyncio.sleep(max(0.01, min(lease.remaining(), lease.timings.retry_period)))
    lease.declare_lost(lease.deadline_reason)


async def _drive_while_held(m: Migration, owned: list[Any], lease: CoordinatorLease) -> Phase:
    """``drive`` the migration; when the lease is lost, stop it (the syncer, the proxies' instructions,
    the proxies themselves) and raise LeaseLost. The status writer is fenced by the lease already, so
    nothing is written between the renew deadline and the end of the stop."""
    loop = asyncio.get_running_loop()
    lost = asyncio.Event()

    def on_lost(reason: str) -> None:   # the renewing thread
        loop.call_soon_threadsafe(lost.set)

    lease.start_renewing(on_lost)
    driving = asyncio.create_task(migrate_cmd.drive(m, owned))
    losing = asyncio.create_task(lost.wait())
    # The deadline on this loop's clock too: a renewal request hanging in the renewing thread must not
    # delay the stop.
    watching = asyncio.create_task(_watch_deadline(lease))
    try:
        await asyncio.wait([driving, losing, watching], return_when=asyncio.FIRST_COMPLETED)
    finally:
        losing.cancel()
        watching.cancel()
    if driving.done() and lease.valid():
        return driving.result()
    # Lost (or an engine step refused by the fenced status writer, which comes to the same).
    lease.declare_lost(lease.deadline_reason)   # (a no-op when the loss was noticed already)
    m.stop_requested.set()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(driving), STOP_AFTER_LOSS_TIMEOUT)
    log.error("coordinator stopped acting", holder=lease.holder, epoch=lease.epoch, at=time.time(),
              reason=lease.lost_reason, stopped=driving.done())
    raise LeaseLost(f"the coordinator lease was lost ({lease.lost_reason}); stopped, restart to contend again")


def _seed_target(kube: Kube, spec: DurableCacheSpec, namespace: str, name: str, tmp: str) -> SeedTarget:
    """Snapshot seeding: the engine calls this once RouteIn has passed (its phase Copy in the status is
    the operator's signal to snapshot and restore); it returns the target once the operator wrote its
    endpoint into checkpoint.operator, or fails with the operator's reason."""
    # A snapshot the user named may predate RouteIn: the writes between it and RouteIn were never marked.
    given = spec.seeding.snapshot_name
    reason = (f"the target was restored from snapshot {given!r} (spec.seeding.snapshotName), which may predate "
              "RouteIn") if given else None

    async def wait() -> SeededTarget:
        deadline = time.monotonic() + SEED_WAIT_LIMIT
        while time.monotonic() < deadline:
            obj = await _get(kube, namespace, name)
            op = ((obj.get("status") or {}).get("checkpoint") or {}).get("operator") or {}
            if op.get("seedFailed"):
                raise DurableCacheError(f"snapshot seeding failed: {op['seedFailed']}")
            if op.get("target"):
                target = await asyncio.to_thread(_side_endpoint, kube, spec, op, "target", tmp)
                return SeededTarget(target, repair_reason=reason)
            await asyncio.sleep(SEED_POLL)
        raise DurableCacheError(f"the target restored from a snapshot was not ready within {SEED_WAIT_LIMIT:.0f}s")

    return wait


def _endpoints(kube: Kube, spec: DurableCacheSpec, op: dict[str, Any], tmp: str) -> tuple[Endpoint, Endpoint | None]:
    """Source and target as the operator provisioned them, with the credentials (and CA bundles) from
    the spec's Secrets; the target None while it is being restored from a snapshot (seeding)."""
    target = _side_endpoint(kube, spec, op, "target", tmp) if op.get("target") else None
    return _side_endpoint(kube, spec, op, "source", tmp), target


def _side_endpoint(kube: Kube, spec: DurableCacheSpec, op: dict[str, Any], side: str, tmp: str) -> Endpoint:
    """One side as the operator provisioned it, with its credentials (and CA bundle) from the spec."""
    part = spec.source if side == "source" else spec.target
    user, password = credentials(kube, spec.namespace, part)
    ca_file = None
    if part.tls.ca:
        ca_file = os.path.join(tmp, f"{side}-ca.pem")
        with open(os.open(ca_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(kube.secret_value(spec.namespace, part.tls.ca.name, part.tls.ca.key))
    return dataclasses.replace(stored_endpoint(op[side]), username=user, password=password, ca_file=ca_file,
                               iam=spec.iam_auth(side))


def proxy_tls_files(kube: Kube, spec: DurableCacheSpec, args: argparse.Namespace,
                     tmp: str) -> tuple[str | None, str | None]:
    """The proxies' certificate and key: the mounted Secret's files (--tls-cert/--tls-key, the pod), or
    spec.proxy.tls.secretName read from the API into ``tmp`` (a worker run as a local process), or
    none (plain TCP)."""
    if args.tls_cert or args.tls_key:
        return args.tls_cert, args.tls_key
    secret = spec.proxy.tls_secret_name
    if secret is None:
        return None, None
    out = []
    for name in (TLS_CERT_KEY, TLS_KEY_KEY):
        path = os.path.join(tmp, f"proxy-{name}")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(kube.secret_value(spec.namespace, secret, name))
        out.append(path)
    return out[0], out[1]


def check_fleet_tls(args: argparse.Namespace) -> None:
    """The fleet's certificate loads and has a channel to serve (before the lease is contended)."""
    if fleettls.from_flags(args.fleet_tls_cert, args.fleet_tls_key) and not args.coordinator_listen:
        raise UsageError("--fleet-tls-cert goes with --coordinator-listen (the channels it secures)")


def coordinator_fleet(args: argparse.Namespace, epoch: int, emit: Emit) -> Fleet | None:
    """The fleet proxies join (--coordinator-listen), driven with this coordinator's lease epoch."""
    if not args.coordinator_listen:
        if not args.proxies:
            raise UsageError("--proxies 0 needs --coordinator-listen: without either, nothing would serve clients")
        return None
    host, port = hostport(args.coordinator_listen, "--coordinator-listen")
    return Fleet(read_token(args.join_token_file, "--coordinator-listen"), epoch=epoch, host=host, port=port,
                 emit=emit, tls=fleettls.from_flags(args.fleet_tls_cert, args.fleet_tls_key))


def fleet_view(fleet: Fleet, wanted: int) -> dict[str, Any]:
    """status.proxies: the proxy pods joined to this coordinator now against the pods wanted. A pod is
    the host of its members' admin addresses (its pod IP, which every process of the pod announces)."""
    pods = {urlsplit(m.admin_base).hostname for m in list(fleet.members.values())}
    return {"ready": len(pods), "total": wanted, "processes": len(fleet.members), "display": f"{len(pods)}/{wanted}"}


def proxy_starter(proxy: ProxySpec, args: argparse.Namespace, host: str, port: int, cert: str | None,
                  key: str | None, emit: Emit, epoch: int = 0) -> tuple[ProxyStarter, list[Any]]:
    """The migration's proxies as spec.proxy says: one in this process, or (processes > 1, or
    --proxy-mode subprocess) that many supervised children sharing the port."""
    processes = proxy.processes or cpu_count()
    if processes > 1 or args.proxy_mode == "subprocess":
        flags = ["--tls-cert", cert, "--tls-key", key] if cert and key else []
        if args.announce:
            flags += ["--announce", args.announce]
        if proxy.max_clients:
            flags += ["--max-clients", str(proxy.max_clients)]
        if proxy.connection_budget:
            flags += ["--connection-budget", str(proxy.connection_budget)]
        return subprocess_proxies(host, port, emit, processes=processes, proxy_args=flags, epoch=epoch)
    announce_host, announce_port = announce_address(args.announce) if args.announce else (None, 0)
    return local_proxies(host, port, server_tls(cert, key), max_clients=proxy.max_clients or 0,
                         announce_host=announce_host, announce_port=announce_port,
                         connection_budget=proxy.connection_budget), []


async def proxy_clients(proxies: list[Any]) -> dict[str, int] | None:
    """status.proxyClients: the client connections of all the migration's proxy processes (open now,
    accepted since they started, refused over spec.proxy.maxClients); None before any proxy runs. A
    proxy that does not answer (restarting) is left out of this round."""
    out = {"clients": 0, "connectionsTotal": 0, "refused": 0}
    seen = False
    for handle in _processes(proxies):
        stats = getattr(handle, "stats", None)
        if stats is None:
            continue
        try:
            s = await stats()
        except (ConnectError, TimeoutError, OSError):
            continue
        seen = True
        out["clients"] += int(s.get("clients") or 0)
        out["connectionsTotal"] += int(s.get("connections_total") or 0)
        out["refused"] += int(s.get("clients_refused") or 0)
    return out if seen else None


def _processes(proxies: list[Any]) -> list[Any]:
    """Every proxy process behind the migration's handles: a fleet stands for its members."""
    out: list[Any] = []
    for handle in proxies:
        out.extend(handle.members.values() if isinstance(handle, Fleet) else [handle])
    return out


def _lag_reader(spec: DurableCacheSpec) -> Any:
    """The target's DurabilityLag for laggovernor.py: aws targets only; a sync target reports 0, so
    the reader stays on across a sync<->async switch."""
    if not spec.target.is_aws:
        return None
    return spec.make_provider(60.0).durability_lag_reader(spec.target_spec())


class Reporter:
    """Turns the engine's events into Events and its status into the resource's status (through the
    StatusStore, the worker's one writer), and the spec's approval, repair and rollback fields into
    calls on the migration."""

    def __init__(self, kube: Kube, obj: dict[str, Any], interval: float):
        self.kube = kube
        self.obj = obj
        self.ns, self.name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        self.interval = interval
        self.store: StatusStore | None = None
        self.migration: Migration | None = None
        self.approved_sent = False
        self.rollback_sent = False
        self.rollback_routed_at: float | None = None
        self.last_gate_event = 0.0
        self.gate_blocked_since: float | None = None   # RouteIn: when clients were first seen on the source
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
        self.fleet: Fleet | None = None
        # No proxy of the worker's own: the applications are routed to the proxy Service only once a
        # proxy has joined (status.checkpoint.worker.proxiesUp), not when the join port opens.
        self.fleet_only = False
        self.proxies_up = False

    # -- from the engine (its event loop, or the status flusher thread) ---------------------------
    def post(self, type_: str, reason: str, message: str) -> None:
        """An Event, posted by the periodic flush (best effort, off the engine's way)."""
        self._event(type_, reason, message)

    def _event(self, type_: str, reason: str, message: str) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (type_, reason, message))

    def on_phase(self, phase: Phase, state: dict[str, Any]) -> None:
        if phase == Phase.FAILED:
            self._event("Warning", "Failed", state.get("message") or "the migration failed")
        else:
            self._event("Normal", phase.value, f"phase {phase.value}")

    def emit(self, e: dict[str, Any]) -> None:
        kind = e.get("event")
        log.info("engine event", **{k: v for k, v in e.items() if k != "event"}, engine_event=kind)
        if kind == "proxies":
            if self.fleet_only:
                self._report_worker({"proxies": e["addresses"]})
                self._event("Normal", "CoordinatorListening", f"proxies join on {', '.join(e['addresses'])}")
            else:
                self._proxies_ready(e["addresses"])
                self._event("Normal", "ProxyReady", f"proxy listening on {', '.join(e['addresses'])}")
        elif kind == "proxy_joined":
            if self.fleet_only and not self.proxies_up:
                self._proxies_ready([f"fleet@{self.fleet.host}:{self.fleet.port}"] if self.fleet else [])
            self._event("Normal", "ProxyJoined", f"proxy {e.get('proxy')} ({e.get('address')}) joined; "
                        f"{e.get('members')} proxy processes")
        elif kind == "proxy_left":
            self._event("Normal", "ProxyLeft", f"proxy {e.get('proxy')} ({e.get('address')}) left; "
                        f"{e.get('members')} proxy processes")
        elif kind == "gate_blocked":
            now = time.monotonic()
            if now - self.last_gate_event >= GATE_EVENT_INTERVAL:
                self.last_gate_event = now
                self._event(*self._gate_event(e, now),
                            f"clients still connected to the source, not through the proxy: {e.get('clients')}")
        elif kind == "awaiting_approval":
            if self.store and not self.store.awaiting_approval:
                self._event("Normal", "AwaitingApproval", "in sync; set spec.cutover.approved=true to cut over")
                self.loop.call_soon_threadsafe(self._spawn, self._write("set_flags", awaiting_approval=True))
        elif kind == "seeded":
            overflow = " (the dirty set overflowed: full verify-and-repair)" if e.get("overflowed") else ""
            self._event("Normal", "Seeded", f"target restored from the snapshot; {e.get('backlog')} keys written "
                        f"since RouteIn to catch up{overflow}")
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
        elif kind == "readiness":     # (ready helper's hunk) the client readiness report, readiness.py
            for problem in e.get("problems") or []:
                self._event("Warning", "ClientReadiness", str(problem))
            if not e.get("problems"):
                self._event("Normal", "ClientsReady", f"the {e.get('connections')} client connections through "
                            "the proxy can use the target after cutover")

    def _report_worker(self, fields: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self._spawn, self._write("report", {"checkpoint": {"worker": fields}}))

    def _proxies_ready(self, addresses: list[str]) -> None:
        """status.checkpoint.worker.proxiesUp: the operator may route the applications to the proxies."""
        self.proxies_up = True
        self._report_worker({"proxiesUp": True, "proxies": addresses})

    def _gate_event(self, e: dict[str, Any], now: float) -> tuple[str, str]:
        """(type, reason) for clients seen on the source around the proxy. In RouteIn that is normal
        while applications move onto the proxy (Normal RouteInWaiting), and a Warning (RouteInBlocked)
        once it lasts GATE_WARN_AFTER; after RouteIn it is always a Warning (DirectClients)."""
        if e.get("phase") not in (None, Phase.ROUTE_IN):
            return "Warning", "DirectClients"
        if self.gate_blocked_since is None:
            self.gate_blocked_since = now
        if now - self.gate_blocked_since >= GATE_WARN_AFTER:
            return "Warning", "RouteInBlocked"
        return "Normal", "RouteInWaiting"

    def _spawn(self, coro: Any) -> None:
        asyncio.ensure_future(coro)

    async def _write(self, what: str, *args: Any, **kwargs: Any) -> None:
        """A StatusStore call off the event loop; a failed write is retried on the next tick."""
        if not self.store:
            return
        try:
            await asyncio.to_thread(getattr(self.store, what), *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - status reporting is retried on the next tick
            log.warning("status not written", error=str(exc)[:200])

    # -- periodic ---------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await self.flush_events()
            try:
                await self._tick()
            except Exception as exc:  # noqa: BLE001 - a spec edited into something unusable, an API hiccup
                log.warning("status not reported", error=str(exc)[:300])
            await asyncio.sleep(self.interval)

    async def flush_events(self) -> None:
        while not self.events.empty():
            type_, reason, message = self.events.get_nowait()
            await asyncio.to_thread(self.kube.event, self.obj, type_, reason, message, WORKER_COMPONENT)

    async def _tick(self) -> None:
        m = self.migration
        if m is None or not m.state:
            return   # not started or not yet resumed: its phase would read as RouteIn
        st = m.status()
        phase = m.phase
        blocked = st.get("repairBlocked")
        report: dict[str, Any] = {
            "progress": progress(st.get("keysCopied") or 0, st.get("keysTotal") or 0, phase),
            "dirtyBacklog": int(st.get("dirtyBacklog") or 0),
            "repairBlocked": blocked["message"] if blocked else None,
            "sideChanges": int(st.get("sideChanges") or 0),
            "durabilityLag": st.get("durabilityLag")}     # laggovernor.py; None without a reader
        if st.get("lastCutoverPauseMs") is not None:
            report["lastCutoverPauseMs"] = st["lastCutoverPauseMs"]
        if st.get("clients") is not None:
            report["clients"] = st["clients"]     # the readiness report (status.clients)
        counts = await proxy_clients(m.proxies)
        if counts is not None:
            report["proxyClients"] = counts
        if self.fleet is not None:
            report["proxies"] = fleet_view(self.fleet, DurableCacheSpec.parse(self.obj).proxy.replicas)
        await self._write("report", report)
        try:
            obj = await asyncio.to_thread(self.kube.get, self.ns, self.name)
        except Exception as exc:  # noqa: BLE001 - read again on the next tick
            log.warning("resource not read", error=str(exc)[:200])
            return
        if obj is None:
            return
        self.obj = obj      # the spec as it is now: spec.proxy.replicas may change while the migration runs
        await self._write("set_flags", repair_blocked=blocked["message"] if blocked else None,
                          generation=obj["metadata"].get("generation"))
        spec = DurableCacheSpec.parse(obj)
        self._follow_spec(m, spec, obj, bool(blocked))

    def _follow_spec(self, m: Migration, spec: DurableCacheSpec, obj: dict[str, Any], blocked: bool) -> None:
        """spec.cutover.approved, spec.repair.acceptDestructive and spec.cutover.rollback, passed on."""
        if spec.cutover.approved and not self.approved_sent and m.approve() is None:
            self.approved_sent = True
            self._event("Normal", "CutoverApproved", "spec.cutover.approved is true: cutting over")
        if blocked and spec.repair.accept_destructive and m.accept_repair() is None:
            self._event("Warning", "RepairAccepted", "spec.repair.acceptDestructive is true: repairing")
        if spec.cutover.rollback and not self.rollback_sent and m.phase == Phase.ROUTE_OUT:
            self._maybe_rollback(m, obj)

    def _maybe_rollback(self, m: Migration, obj: dict[str, Any]) -> None:
        # The operator first moves the applications back onto the proxy; only then may the proxy flip
        # back, or writes made directly on the target would be missed.
        route = (((obj.get("status") or {}).get("checkpoint") or {}).get("operator") or {}).get("route")
        if route != "proxy":
            return
        if self.rollback_routed_at is None:
            self.rollback_routed_at = time.monotonic()
        if time.monotonic() - self.rollback_routed_at < ROLLBACK_SETTLE:
            return
        if m.request_rollback() is None:
            self.rollback_sent = True
            self._event("Normal", "RollbackRequested", "spec.cutover.rollback is true: moving back to the source")
