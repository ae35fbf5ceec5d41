"""The migration protocol (docs/design.md, docs/protocol.md), runtime-agnostic: the CLI and the
operator's worker run this.

RouteIn -> Copy -> Sync -> Cutover -> RouteOut -> Complete (and Failed, RollingBack, RolledBack); the
operator's Preflight and Provision come before and are not the engine's (phases.py). Its settings are
MigrationOptions (options.py).

One module over 600 lines on purpose: it is one state machine whose steps share the saved state, the
syncer and the proxies; the parts that stand alone live beside it (options, phases, syncer, trust, gate,
repairplan, verify).

Everything that must survive a restart is in ``self.state`` and saved through a CheckpointStore
(the CLI: a file; the operator: the resource's status). After any restart past RouteIn the proxies'
in-memory marks may be lost, so a full verify-and-repair runs before any cutover.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from . import logs
from .checkpoint import CheckpointStore, MemoryCheckpoint
from .copier import BulkCopy, check_pair
from .errors import ConnectError, DurableCacheError
from .gate import wait_for_gate
from .gcpause import GcHold
from .keymover import MoverOptions
from .laggovernor import LagControl
from .movers import MoverPool
from .options import MigrationOptions
from .phases import APPROVABLE_PHASES, FINAL_PHASES, OPERATOR_PHASES, Phase, phase_or_none
from .progress import JsonProgress
from .readiness import ReadinessWatch
from .repairplan import RepairPlan
from .syncer import DirtyKey, Syncer
from .topology import Topology, discover
from .trust import Trust
from .urls import Endpoint
from .verify import Verifier

log = logs.get("durablecache.migration")
STATE_VERSION = 1
PLANNED_REPAIR = "verify pass after the copy"
GC_HOLD_LIMIT = 30.0   # seconds the collector may stay off for one switch of authority (gcpause.py)
BUDGET_RETRY = 5.0     # seconds between attempts a connection budget refused (no attempt counted)
CATCH_UP_LIMIT = 1.0   # seconds an attempt lets the syncer make up, after PREPARE, for what it held up
__all__ = ["Migration", "MigrationOptions", "Phase", "ProxyHandle", "ProxyStarter", "SeedTarget", "SeededTarget"]


class ProxyHandle(Protocol):
    """A running proxy, in this process or another (see durablecache.proxyhandles)."""

    address: str

    async def prepare_flip(self, upstream: Endpoint) -> None: ...

    async def unprepare(self) -> None: ...

    async def freeze(self, timeout: float) -> None: ...

    async def flip(self, upstream: Endpoint) -> None: ...

    async def unfreeze(self) -> None: ...

    async def hold_keys(self, keys: set[tuple[int, bytes]], timeout: float) -> None: ...

    async def release_keys(self) -> None: ...

    async def stop(self) -> None: ...


MarkCallback = Callable[[int, list[bytes]], Awaitable[None] | None]   # as the proxy's (proxy/marks.py)
# (upstream, on_marks, on_lost) -> running proxies. on_lost(reason): a proxy died with marks in flight.
ProxyStarter = Callable[[Endpoint, MarkCallback, Callable[[str], None]], Awaitable[list[ProxyHandle]]]
Emit = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class SeededTarget:
    """A target restored from a snapshot of the source (snapshot seeding, docs/aws.md)."""

    endpoint: Endpoint
    # Set when the snapshot may predate RouteIn (one the user named): writes between it and RouteIn
    # were never marked, so everything is verified and repaired before any cutover.
    repair_reason: str | None = None


# Called once RouteIn has passed: takes the snapshot, restores the target from it and returns it when
# it is ready (the operator's worker waits for the operator to do that). Idempotent: a restarted
# migration calls it again and gets the same target.
SeedTarget = Callable[[], Awaitable[SeededTarget]]


class Migration:
    def __init__(self, source: Endpoint, target: Endpoint | None, opts: MigrationOptions, start_proxies: ProxyStarter,
                 *, emit: Emit | None = None, store: CheckpointStore | None = None,
                 seed_target: SeedTarget | None = None):
        """``seed_target``: snapshot seeding. The target (``target`` may be None until then) comes from
        it once RouteIn has passed, already holding the data, and replaces the bulk copy."""
        if target is None and seed_target is None:
            raise ValueError("a migration needs a target, or seed_target to obtain one")
        self.source_ep = source
        self._target_ep = target
        self.seed_target = seed_target
        self.opts = opts
        self.start_proxies = start_proxies
        self.emit = emit or (lambda _e: None)
        self.store = store or MemoryCheckpoint()
        self.state: dict[str, Any] = {}
        self.proxies: list[ProxyHandle] = []
        self._gc_hold = GcHold()
        self.syncer: Syncer | None = None
        self.source: Topology | None = None
        self.target: Topology | None = None
        self.bulk: BulkCopy | None = None
        self.trust: Trust | None = None
        self._watch: asyncio.Task[None] | None = None
        self.approved = asyncio.Event()
        self.rollback_requested = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self.repair_accepted = asyncio.Event()
        self._accept_next_repair = opts.accept_destructive_repair
        self._direct_writers_seen: list[str] = []
        self.lag = LagControl(opts.target_lag, lambda e: self.emit(e), opts.lag_interval)
        self.readiness = ReadinessWatch(lambda e: self.emit(e), opts.watch_interval)

    # -- state ------------------------------------------------------------------------------------
    @property
    def target_ep(self) -> Endpoint:
        if self._target_ep is None:
            raise DurableCacheError("the target is not known yet: it is being restored from a snapshot")
        return self._target_ep

    @property
    def phase(self) -> Phase:
        """The phase reached; RouteIn before the engine began, since that is where it starts (a state
        saved by an older version may name an operator phase: the engine had not begun either)."""
        saved = phase_or_none(self.state.get("phase"))
        return Phase.ROUTE_IN if saved is None or saved in OPERATOR_PHASES else saved

    def set_phase(self, phase: Phase, **extra: Any) -> None:
        self.state["phase"] = phase.value
        self.state.update(extra)
        self.save()
        log.info("phase", phase=phase.value)
        self.emit({"event": "phase", "phase": phase.value, **extra})

    def save(self) -> None:
        self.state["version"] = STATE_VERSION
        self.store.save(self.state)

    def status(self) -> dict[str, Any]:
        """What the operator and the control API show: phase, progress, backlog, last pause."""
        copy_state = self.bulk.totals() if self.bulk else None
        syncer = self.syncer
        return {
            "phase": self.phase.value,
            "flipped": bool(self.state.get("flipped")),
            "keysCopied": copy_state.keys if copy_state else self.state.get("keysCopied", 0),
            "keysTotal": self.state.get("keysTotal", 0),
            "dirtyBacklog": syncer.backlog if syncer else 0,
            "repairRequired": syncer.repair_reason if syncer else None,
            "lastCutoverPauseMs": self.state.get("lastCutoverPauseMs"),
            "lastCutoverKeyPauseMs": self.state.get("lastCutoverKeyPauseMs"),
            "repairBlocked": self.state.get("repairBlocked"),
            "authorityChanged": self.state.get("authorityChanged"),
            "sideChanges": self.state.get("sideChanges", 0),
            "durabilityLag": self.lag.status(),
            "directClients": list(self.trust.direct_clients) if self.trust else [],
            "clients": self.readiness.summary,
            "syncer": dataclasses.asdict(syncer.stats) if syncer else {},
            "message": self.state.get("message", ""),
        }

    # -- requests from outside (the control API, the operator's worker) --------------------------
    def approve(self) -> str | None:
        """Let a manual cutover proceed; None when accepted, else why not."""
        if self.phase not in APPROVABLE_PHASES:
            return f"nothing to approve in phase {self.phase.value}"
        self.approved.set()
        return None

    def request_rollback(self) -> str | None:
        """Move back to the source (RouteOut only); None when accepted, else why not."""
        if self.phase != Phase.ROUTE_OUT:
            return f"rollback is possible in RouteOut, not {self.phase.value}"
        self.rollback_requested.set()
        return None

    def accept_repair(self) -> str | None:
        """Let a repair that stopped to ask go ahead; None when accepted, else why not."""
        if not self.state.get("repairBlocked"):
            return "no repair is waiting for acceptance"
        self.repair_accepted.set()
        return None

    # -- the protocol -----------------------------------------------------------------------------
    async def run(self) -> Phase:
        saved = self.store.load()
        if saved and saved.get("version") == STATE_VERSION:
            self.state = saved
        if self.phase == Phase.FAILED:
            raise DurableCacheError(f"this migration failed earlier and stays failed: {self.state.get('message')}")
        if self.phase in FINAL_PHASES:
            if self.phase != Phase.FAILED and self._serves_after_end():
                try:
                    await self._serve_after_end()
                finally:
                    await self._shutdown()
            return self.phase
        try:
            await self._run()
        except DurableCacheError as exc:
            self.set_phase(Phase.FAILED, message=str(exc))
            raise
        finally:
            await self._shutdown()
        return self.phase

    async def _run(self) -> None:
        resumed_after_route_in = self.phase != Phase.ROUTE_IN
        if resumed_after_route_in:
            self.set_phase(self.phase)   # says where it resumes
        flipped = bool(self.state.get("flipped"))
        seeding = self.seed_target is not None and self.phase in (Phase.ROUTE_IN, Phase.COPY)
        if seeding:
            self.source = await discover(self.source_ep)
            # Marks are collected from RouteIn on, before any target exists (_seed attaches it).
            self.syncer = Syncer(None, workers=self.opts.sync_workers, max_dirty=self.opts.max_dirty)
        else:
            await self._open_pair(resumed_after_route_in, flipped)
        assert self.syncer and self.source
        if resumed_after_route_in:
            self.syncer.require_repair("resumed after a restart: marks in flight may have been lost")
            if self.trust:
                with contextlib.suppress(ConnectError):     # a side still down: the watch reports it later
                    await self.trust.changes_since_trusted()   # says what changed while nobody watched
        if not resumed_after_route_in:
            self.set_phase(Phase.ROUTE_IN)
        upstream = self.target_ep if flipped else self.source_ep
        self.proxies = await self.start_proxies(upstream, self.syncer.on_marks, self.syncer.require_repair)
        self.emit({"event": "proxies", "addresses": [p.address for p in self.proxies]})
        if self.target:
            self.readiness.start(self.proxies, self.target.cluster)
        if self.phase == Phase.ROUTE_IN:
            await wait_for_gate(self.source, self.opts.allow_clients, self.opts.gate_settle, self.opts.gate_timeout,
                                on_blocked=lambda c: self.emit({"event": "gate_blocked", "clients": c}))
            if self.trust:
                await self.trust.establish()   # what the copy makes equal
            self.set_phase(Phase.COPY)
        if seeding:
            await self._seed()
        assert self.trust
        self._watch = asyncio.create_task(self.trust.watch(self.opts.watch_interval, self._source_writable))
        if self.phase == Phase.COPY:
            if not seeding:
                await self._copy()
            self.set_phase(Phase.SYNC)
        if self.phase == Phase.CUTOVER:
            # Resumed inside a cutover attempt. ``flipped`` is saved once every proxy has flipped: then
            # the target is authoritative (the restarted proxies start on it) and the cutover is done;
            # otherwise the attempt was aborted by the restart.
            self.set_phase(Phase.ROUTE_OUT if flipped else Phase.SYNC)
        if self.phase == Phase.SYNC:
            await self._sync_until_cutover()
        if self.phase == Phase.ROUTE_OUT:
            if resumed_after_route_in and self.syncer.repair_reason:
                # Reverse sync's marks died with the old process: make the source equal again first,
                # so that a rollback within the window still finds it current.
                await self._repair_retrying()
            await self._route_out()
        if self.phase == Phase.ROLLING_BACK:
            await self._rollback()
        if self.phase in (Phase.COMPLETE, Phase.ROLLED_BACK) and self._serves_after_end():
            # Applications may still point at the proxy: keep serving until told to stop, with
            # nothing left to copy (afterCutover proxy).
            await self._end_sync()
            self._serving()
            await self.stop_requested.wait()

    async def _open_pair(self, allow_nonempty: bool, flipped: bool) -> None:
        """Both sides discovered and checked, the syncer copying towards the side that is not
        authoritative, the trust record of both."""
        self.source, self.target = await discover(self.source_ep), await discover(self.target_ep)
        await check_pair(self.source, self.target, allow_nonempty=allow_nonempty,
                         nonempty_hint="a migration needs an empty target (a new cluster); empty it or pick another")
        self.syncer = Syncer(self._pool(reverse=flipped), workers=self.opts.sync_workers, max_dirty=self.opts.max_dirty)
        self.syncer.start()
        self._trust()

    def _trust(self) -> None:
        assert self.source and self.target
        self.trust = Trust(self.source, self.target, self.state, on_change=self._side_changed,
                           on_clients=self._direct_clients, allow_clients=self.opts.allow_clients)

    async def _seed(self) -> None:
        """Snapshot seeding, in place of the bulk copy: RouteIn has passed, so every write from now on
        is marked; the target is restored from a snapshot taken after this point (seed_target), and the
        syncer then copies every key marked since RouteIn. A dirty set that overflowed while the
        restore ran has already demanded the full verify-and-repair, which Sync runs first."""
        assert self.seed_target and self.syncer and self.source
        self.emit({"event": "seeding", "backlog": self.syncer.backlog})
        seeded = await self.seed_target()
        self._target_ep = seeded.endpoint
        self.target = await discover(self.target_ep)
        # The restored target holds the snapshot's keys: not empty, by design.
        await check_pair(self.source, self.target, allow_nonempty=True, nonempty_hint="")
        self.syncer.attach(self._pool(reverse=False))
        self.syncer.start()
        self._trust()
        assert self.trust
        await self.trust.establish()   # the servers the catch-up and the verify make equal
        if seeded.repair_reason:
            self.syncer.require_repair(seeded.repair_reason)
        self.readiness.start(self.proxies, self.target.cluster)
        self.emit({"event": "seeded", "target": self.target_ep.redacted(), "backlog": self.syncer.backlog,
                   "overflowed": self.syncer.stats.overflowed})

    def _serves_after_end(self) -> bool:
        return self.opts.after_cutover == "proxy" and not self.opts.exit_after_cutover

    def _serving(self) -> None:
        self.emit({"event": "serving", "upstream": (self.target_ep if self.state.get("flipped")
                                                      else self.source_ep).redacted()})

    async def _end_sync(self) -> None:
        """The migration is over: the proxies stop marking (and refusing what only a migration
        must refuse), the syncer stops and its connections close."""
        await self.readiness.stop()
        for p in self.proxies:
            end = getattr(p, "end_migration", None)
            if end is not None:
                await end()
        syncer, self.syncer = self.syncer, None
        if syncer is not None:
            await syncer.stop()
            await syncer.close_pools(current=True)

    async def _serve_after_end(self) -> None:
        """Resumed after the end with afterCutover proxy: the proxies alone, in front of the side
        that holds the data now, until told to stop."""
        upstream = self.target_ep if self.state.get("flipped") else self.source_ep
        self.proxies = await self.start_proxies(upstream, _no_marks, lambda _why: None)
        await self._end_sync()
        self.emit({"event": "proxies", "addresses": [p.address for p in self.proxies]})
        self._serving()
        await self.stop_requested.wait()

    def _pool(self, reverse: bool) -> MoverPool:
        assert self.source and self.target
        src, dst = (self.target, self.source) if reverse else (self.source, self.target)
        # The bulk copy's batches take movers themselves (Syncer.copy_now), copy_concurrency per source
        # primary: sync_workers more, so the workers copying live marks find movers free meanwhile.
        pool = MoverPool(src, dst, size=(self.opts.copy_concurrency + self.opts.sync_workers) * len(src.primaries),
                         opts=MoverOptions(big_key_bytes=self.opts.big_key_bytes),
                         max_source_ops=self.opts.max_source_ops, max_target_bytes=self.opts.max_target_bytes,
                         name="durablecache-sync")
        self.lag.follow(pool, writes_target=not reverse)
        return pool

    async def _copy(self) -> None:
        assert self.source and self.target and self.syncer
        copy_store = _SubStore(self, "copy")
        self.bulk = BulkCopy(self.source, self.target, self.syncer.copy_now, store=copy_store,
                             progress=_EmitProgress(self), scan_count=self.opts.scan_count,
                             concurrency=self.opts.copy_concurrency)
        summary = await self.bulk.run()
        self.state["keysCopied"] = summary.keys
        self.emit({"event": "copied", "keys": summary.keys, "seconds": round(summary.seconds, 3),
                   "keys_per_s": round(summary.keys / summary.seconds, 1) if summary.seconds else 0})

    async def repair(self, *, keep_extra: bool = False) -> int:
        """Full verify-and-repair: every differing key is marked dirty again, then drained.

        Before anything is written, what the repair would do to the side it writes is counted: deleting
        or overwriting more than a small share of it stops and asks (``repair_blocked``) until accepted
        — the authoritative side may be the one that lost its data. ``keep_extra``: keys only the
        written side holds are kept (a rollback after the target lost data, docs/protocol.md)."""
        assert self.syncer and self.trust
        syncer = self.syncer
        for _ in range(1 << 30):   # once, or again after the operator accepted a blocked repair
            reason = syncer.repair_reason
            syncer.repair_reason = None
            self.emit({"event": "repair", "reason": reason, "planned": reason == PLANNED_REPAIR})
            readings = await self.trust.establish()   # the servers this repair makes equal
            src, dst = self._sides()
            written = "source" if self.state.get("flipped") else "target"
            written_keys = sum(readings[written].keys.values())
            plan = RepairPlan(pending=syncer.pending)
            report = await Verifier(src, dst, on_diff=plan.record).run()
            if keep_extra:
                plan.deletes.clear()
            if self._accept_next_repair or not plan.too_destructive(written_keys, self.opts.repair_max_share,
                                                                    self.opts.repair_min_keys):
                break
            await self._ask_before_repair(plan, written, written_keys, reason)
        self._accept_next_repair = self.opts.accept_destructive_repair
        todo = plan.to_copy()
        for db, key in todo:
            syncer.mark(db, [key])
        repaired = len(todo)
        self.emit({"event": "repaired", "keys": repaired, "checked": report.checked, **plan.summary()})
        await self._drain_background()
        return repaired

    def _check_watch(self) -> None:
        """The watch of both sides must be running: without it a restarted or failed-over server would
        go unnoticed, so its failure ends the migration rather than letting it cut over blind."""
        if self._watch and self._watch.done() and not self._watch.cancelled() and self._watch.exception():
            raise DurableCacheError(f"the watch of both sides failed: {self._watch.exception()!r}")

    async def _repair_retrying(self, **kwargs: Any) -> None:
        """A repair that cannot reach a side (a server restarting, a network cut) is tried again, with
        backoff, rather than failing the migration: the fault is what the repair is there for."""
        assert self.syncer
        for attempt in range(1, 1 << 30):
            reason = self.syncer.repair_reason
            try:
                await self.repair(**kwargs)
                return
            except ConnectError as exc:
                self.syncer.require_repair(reason or "repair interrupted")
                self.emit({"event": "repair_interrupted", "attempt": attempt, "reason": str(exc)})
                await asyncio.sleep(min(0.5 * attempt, 5.0))

    async def _ask_before_repair(self, plan: RepairPlan, written: str, written_keys: int, reason: str | None) -> None:
        """Hold the repair (and so any cutover) until the operator accepts it; nothing is written meanwhile."""
        authority = "target" if written == "source" else "source"
        message = (f"a repair would delete {len(plan.deletes)} and overwrite {len(plan.overwrites)} of the "
                   f"{written_keys} keys on the {written} (and add {len(plan.adds)}), more than "
                   f"{self.opts.repair_max_share:.0%}: the {authority}, which is authoritative, may have lost data "
                   f"({reason}). Nothing was written. Accept it (control accept-repair, "
                   f"--accept-destructive-repair, spec.repair.acceptDestructive) to make the {written} equal to "
                   f"the {authority}, or stop and restore the {authority}")
        self.state["repairBlocked"] = {"message": message, **plan.summary(), "side": written,
                                       "sideKeys": written_keys}
        self.save()
        log.warning("repair blocked", message=message)
        self.emit({"event": "repair_blocked", "message": message, "side": written, "side_keys": written_keys,
                   **plan.summary()})
        self.repair_accepted.clear()
        await self.repair_accepted.wait()
        self.state.pop("repairBlocked", None)
        self.save()
        self._accept_next_repair = True
        self.emit({"event": "repair_accepted"})
        assert self.syncer
        self.syncer.require_repair(reason or "accepted repair")

    # -- faults around us ---------------------------------------------------------------------
    def _authority(self) -> str:
        return "target" if self.state.get("flipped") else "source"

    def _source_writable(self) -> bool:
        """Is the source authoritative and written through the proxies (so a direct writer is lost)?"""
        return not self.state.get("flipped") and self.phase in (Phase.COPY, Phase.SYNC, Phase.CUTOVER)

    def _side_changed(self, side: str, changes: list[str]) -> None:
        authoritative = side == self._authority()
        log.warning("side changed", side=side, authoritative=authoritative, changes=changes)
        self.emit({"event": "side_changed", "side": side, "authoritative": authoritative, "changes": changes})
        self.state["sideChanges"] = self.state.get("sideChanges", 0) + 1
        if authoritative:
            self.state["authorityChanged"] = {"side": side, "changes": changes}
        self.save()
        assert self.syncer
        self.syncer.require_repair(f"the {side} changed: {'; '.join(changes)}")

    def _direct_clients(self, clients: list[str]) -> None:
        """Clients on the source around the proxy: their writes are invisible to the syncer. No cutover
        while they are there, and a repair once they are gone."""
        if clients:
            self._direct_writers_seen = clients
            self.emit({"event": "gate_blocked", "clients": clients, "phase": self.phase.value})
            return
        if self._direct_writers_seen and self.syncer:
            seen = ", ".join(self._direct_writers_seen[:3])
            self.syncer.require_repair(f"clients connected to the source directly: {seen}")
        self._direct_writers_seen = []

    def _sides(self) -> tuple[Topology, Topology]:
        assert self.source and self.target
        return (self.target, self.source) if self.state.get("flipped") else (self.source, self.target)

    async def _drain_background(self, timeout: float = 600.0) -> None:
        """Wait until the syncer has caught up: the backlog at most ready_backlog keys. (Not empty: a
        key written continuously is never clean for long; the cutover's own drain empties it.)"""
        assert self.syncer
        if not await self.syncer.settle(self.opts.ready_backlog, timeout):
            raise DurableCacheError(f"the syncer could not catch up within {timeout:.0f}s "
                                    f"(backlog {self.syncer.backlog}); the target may be too slow")

    async def _sync_until_cutover(self) -> None:
        assert self.syncer
        if self.opts.verify_in_sync:
            # docs/protocol.md, Copy and Sync: compare both sides once the copy is done; it also catches
            # what key tracking cannot see (scripts writing undeclared keys) up to this point.
            self.syncer.require_repair(PLANNED_REPAIR, planned=True)
        attempts = 0
        for _ in range(1 << 30):  # bounded by cutover_attempts and by stop/rollback requests
            self._check_watch()
            if self.syncer.repair_reason:
                await self._repair_retrying()
                continue
            await self._drain_background()
            if self.opts.cutover == "manual" and not self.approved.is_set():
                self.emit({"event": "awaiting_approval"})
                self.syncer.repair_wanted.clear()     # a fault meanwhile is repaired at once, not at approval
                if not self.syncer.repair_reason:
                    await self._wait_any(self.approved, self.stop_requested, self.syncer.repair_wanted)
                if self.stop_requested.is_set():
                    return
                continue
            if self.syncer.backlog > self.opts.ready_backlog:
                await asyncio.sleep(0.05)
                continue
            assert self.trust
            if await self.trust.look_for_direct_clients():
                await asyncio.sleep(self.opts.watch_interval)   # no cutover while anyone writes around us
                continue
            attempts += 1
            self._check_watch()
            done = await self.cutover(attempts)
            if done.ok:
                self.set_phase(Phase.ROUTE_OUT)
                return
            if done.over_budget:
                # Not a failed drain: the servers cannot take a second connection per client now.
                # Waiting (in Sync, writes flowing) until clients leave or the budget is raised is
                # all that can be done, so it does not count towards cutover_attempts.
                attempts -= 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_requested.wait(), BUDGET_RETRY)
                if self.stop_requested.is_set():
                    return
                continue
            if attempts >= self.opts.cutover_attempts:
                knob = "maxWritePause" if self.opts.drain_limit == self.opts.max_write_pause else "drainBudget"
                raise DurableCacheError(
                    f"cutover aborted {attempts} times: the dirty backlog could not be drained within "
                    f"{self.opts.drain_limit * 1000:.0f} ms (hot keys: within {self.opts.max_key_pause:.1f} s); "
                    f"raise {knob} / maxKeyPause or lower the write load")
            await asyncio.sleep(min(0.2 * attempts, 2.0))

    async def cutover(self, attempt: int) -> _Switched:
        """One attempt to make the target authoritative (_switch_authority), or abort back to Sync."""
        assert self.syncer and self.target
        self.set_phase(Phase.CUTOVER)
        done = await self._switch_authority(_Switch(
            to=self.target_ep, back=self.source_ep, authoritative="source", reverse_after=True,
            budget=self.opts.max_write_pause, drain_limit=self.opts.drain_limit, last_check=True,
            on_flipped=lambda: self.state.update(flipped=True)))
        if not done.ok:
            self.emit({"event": "cutover_aborted", "attempt": attempt, "reason": done.reason,
                       "pause_ms": done.pause_ms, "held_keys": done.held_keys, "key_pause_ms": done.key_pause_ms})
            self.set_phase(Phase.SYNC)
            return done
        self.state["lastCutoverPauseMs"] = done.pause_ms
        self.state["lastCutoverKeyPauseMs"] = done.key_pause_ms
        self.save()
        self.emit({"event": "cutover", "pause_ms": done.pause_ms, "freeze_ms": round(done.frozen_ms, 2),
                   "steps_ms": done.steps_ms, "attempt": attempt, "held_keys": done.held_keys,
                   "key_pause_ms": done.key_pause_ms})
        return done

    async def _switch_authority(self, sw: _Switch) -> _Switched:
        """PREPARE -> [HOLD hot keys] -> FREEZE -> DRAIN -> [LAST CHECK] -> FLIP -> UNFREEZE [-> RELEASE]
        within the bounds, or undo it all: the cutover (source -> target) and the rollback (back).

        PREPARE has the proxies discover the new side while writes still flow, so that FLIP only moves
        the sessions. A key whose copy takes longer than half the drain limit (a hot big key) could
        never be drained inside the pause while it is being written. So first only the writes to such
        keys are held (other keys and all reads go on) until the syncer has copied them after their last
        write — bounded by max_key_pause — and only then is everything frozen; the drain then finds them
        clean. Nobody lists clients meanwhile (Trust.no_looks, ReadinessWatch.quiet).
        ``sw.on_flipped`` records the new authority, saved before any write resumes."""
        assert self.trust
        async with self.trust.no_looks(), self.readiness.quiet():
            return await self._switch(sw)

    async def _switch(self, sw: _Switch) -> _Switched:
        """_switch_authority's steps."""
        assert self.syncer
        held: set[DirtyKey] = set()
        k0: float | None = None     # when the hot keys' writes began to be held
        t0: float | None = None     # when everything was frozen
        frozen_ms = 0.0
        steps: dict[str, float] = {}    # each step of the pause, for the event: what a long pause spent
        switched = False
        try:
            before = self.syncer.backlog
            await self._prepare_flip(sw.to)
            # PREPARE's connects kept the syncer from some of its work: let it make that up while
            # writes still flow, not inside the pause (bounded: a failed catch-up only costs pause).
            await self.syncer.shrink_to(before, CATCH_UP_LIMIT)
            held = self.syncer.slow_keys(sw.drain_limit / 2)
            if held:
                k0 = time.monotonic()
                await self._hold_keys(held, self.opts.max_key_pause)
            self._gc_hold.start(GC_HOLD_LIMIT)
            t0 = time.monotonic()
            await self._on_every_proxy(lambda p: p.freeze(sw.budget))
            frozen_ms = (time.monotonic() - t0) * 1000
            drain_for = min(max(0.0, sw.budget - (time.monotonic() - t0)), sw.drain_limit)
            drained = await self.syncer.drain(drain_for)
            steps["drain"] = _ms_since(t0) - frozen_ms
            if not drained or self.syncer.repair_reason:
                backlog = f"backlog of {self.syncer.backlog} keys not drained within {drain_for * 1000:.0f} ms"
                raise TimeoutError("repair required" if self.syncer.repair_reason else backlog)
            if sw.last_check:
                await self._last_check(sw.authoritative, sw.budget - (time.monotonic() - t0))
            steps["check"] = _ms_since(t0) - frozen_ms - steps["drain"]
            # Both sides are equal and no write is in flight: the other side becomes authoritative.
            self.syncer.switch_pool(self._pool(reverse=sw.reverse_after))
            switched = True
            await self._flip_all(sw.to, back=sw.back)
            sw.on_flipped()
            self.save()
            steps["flip"] = _ms_since(t0) - frozen_ms - steps["drain"] - steps["check"]
        except (TimeoutError, DurableCacheError, OSError) as exc:
            if switched:  # FLIP failed: the old side stays authoritative, copy towards the other again
                await self._switch_back(reverse=not sw.reverse_after)
            over_budget = "connection budget:" in str(exc)   # a proxy refused it (its own process or ours)
            if over_budget:
                self.emit({"event": "connection_budget", "reason": str(exc)})
            pause_ms = 0.0
            if t0 is not None:
                await asyncio.gather(*(p.unfreeze() for p in self.proxies), return_exceptions=True)
                pause_ms = _ms_since(t0)
            self._gc_hold.end()
            await self._unprepare_all()
            await self._release_keys(held)
            return _Switched(False, str(exc) or "freeze timed out", pause_ms, frozen_ms, len(held), _ms_since(k0),
                             flip_failed=switched, over_budget=over_budget)
        except BaseException:
            # Anything else (a syncer failure, cancellation) ends the migration: hold nothing meanwhile.
            if t0 is not None:
                await asyncio.gather(*(p.unfreeze() for p in self.proxies), return_exceptions=True)
            self._gc_hold.end()
            await self._unprepare_all()
            await self._release_keys(held)
            raise
        await self._on_every_proxy(lambda p: p.unfreeze())
        pause_ms = _ms_since(t0)
        self._gc_hold.end()
        await self._release_keys(held)   # held writes go on, to the new side now
        key_pause_ms = _ms_since(k0)
        await self.syncer.close_pools()  # the old direction's connections, no longer needed
        steps["unfreeze"] = pause_ms - frozen_ms - sum(steps.values())
        return _Switched(True, "", pause_ms, frozen_ms, len(held), key_pause_ms,
                         steps_ms={"freeze": round(frozen_ms, 2), **{k: round(v, 2) for k, v in steps.items()}})

    async def _on_every_proxy(self, call: Callable[[ProxyHandle], Awaitable[None]]) -> None:
        """``call`` on every proxy at once. With one proxy, awaited directly: a task would only start
        on the event loop's next turn, after whatever else is ready — time that counts in the pause."""
        if len(self.proxies) == 1:
            await call(self.proxies[0])
            return
        await asyncio.gather(*(call(p) for p in self.proxies))

    async def _last_check(self, authoritative: str, left: float) -> None:
        """Inside the pause, after the drain: the same servers as at the last repair on both sides, and
        equal key counts. Otherwise the attempt aborts (DurableCacheError) and a repair is demanded."""
        assert self.trust and self.syncer
        why = await self.trust.before_flip(authoritative, left)
        if why:
            self.syncer.require_repair(why)
            raise DurableCacheError(why)

    async def _switch_back(self, *, reverse: bool) -> None:
        """After a failed FLIP, while still frozen: copy in the old direction again, and close the
        pool of the direction just abandoned before writes resume, so that no copy begun in it runs on
        once the old side takes writes again."""
        assert self.syncer
        self.syncer.switch_pool(self._pool(reverse=reverse))
        await self.syncer.close_pools()

    async def _prepare_flip(self, upstream: Endpoint) -> None:
        """Every proxy discovers ``upstream`` now, before the freeze, not during its flip."""
        results = await asyncio.gather(*(p.prepare_flip(upstream) for p in self.proxies), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _unprepare_all(self) -> None:
        """An aborted attempt: the connections its PREPARE opened are closed (a proxy that cannot be
        reached is left: its next PREPARE or FLIP closes them)."""
        await asyncio.gather(*(p.unprepare() for p in self.proxies), return_exceptions=True)

    async def _flip_all(self, upstream: Endpoint, back: Endpoint) -> None:
        """FLIP every (frozen) proxy to ``upstream``. If any flip fails, every proxy is flipped ``back``
        before anyone is unfrozen, and the error is raised: one proxy writing to the new side while the
        others write to the old one would split the authority (and a failed flip's outcome is unknown,
        so it is flipped back too). A proxy that cannot be flipped back is stopped, so that it cannot
        take writes on the wrong side, and the migration ends (RuntimeError: not an aborted attempt to
        retry); its clients lose their connection, nothing is lost."""
        results = await asyncio.gather(*(p.flip(upstream) for p in self.proxies), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if not failed:
            return
        reverted = await asyncio.gather(*(p.flip(back) for p in self.proxies), return_exceptions=True)
        stuck = [(p, r) for p, r in zip(self.proxies, reverted) if isinstance(r, BaseException)]
        for proxy, why in stuck:
            log.error("proxy stopped: it could not be flipped back", address=proxy.address, reason=str(why))
            self.emit({"event": "proxy_stopped", "address": proxy.address, "reason": f"flip back failed: {why}"})
            try:
                await proxy.stop()
            except Exception as exc:  # noqa: BLE001 — stopped or gone either way
                log.warning("proxy stop failed", address=proxy.address, reason=str(exc))
        if stuck:
            raise RuntimeError(f"{len(stuck)} proxy(ies) could not be flipped back to {back.redacted()} after a "
                               f"failed flip ({failed[0]}); they were stopped and the migration stops")
        raise failed[0]

    async def _hold_keys(self, keys: set[DirtyKey], limit: float) -> None:
        """Hold writes to ``keys`` on every proxy, then wait until the syncer copied each of them after
        its last write; all within ``limit`` seconds, else TimeoutError (the caller releases)."""
        assert self.syncer
        t0 = time.monotonic()
        await asyncio.gather(*(p.hold_keys(keys, limit) for p in self.proxies))
        left = max(0.0, limit - (time.monotonic() - t0))
        if not await self.syncer.wait_copied(keys, left):
            slowest = max(self.syncer.expected_copy(dk) for dk in keys)
            raise TimeoutError(f"{len(keys)} hot key(s) (slowest copy {slowest * 1000:.0f} ms) not copied within "
                               f"maxKeyPause {limit:.1f}s")

    async def _release_keys(self, keys: set[DirtyKey]) -> None:
        if not keys:
            return
        for r in await asyncio.gather(*(p.release_keys() for p in self.proxies), return_exceptions=True):
            if isinstance(r, BaseException):  # a proxy that died has no hold left; its restart forces a repair
                log.warning("release_keys failed", error=str(r))

    async def _route_out(self) -> None:
        """Applications move to the target; reverse sync keeps the source usable for a rollback."""
        self.emit({"event": "route_out", "target": self.target_ep.redacted(),
                   "rollback_window_s": self.opts.rollback_window})
        if self.opts.exit_after_cutover:
            self.set_phase(Phase.COMPLETE)
            return
        window = asyncio.create_task(asyncio.sleep(self.opts.rollback_window))
        try:
            await self._wait_any(self.rollback_requested, self.stop_requested, task=window)
        finally:
            window.cancel()
        if self.rollback_requested.is_set():
            self.set_phase(Phase.ROLLING_BACK)
        elif window.done() and not window.cancelled():
            self.set_phase(Phase.COMPLETE)

    async def _rollback(self) -> None:
        """The cutover in reverse: the source becomes authoritative again, nothing written is lost."""
        assert self.syncer and self.target
        # After RouteOut applications may have written to the target directly, where no proxy saw
        # them: wait until they are all back on the proxy, then repair the source from the target.
        await self._rollback_gate()
        self.syncer.require_repair("rollback: writes made directly on the target were not tracked")
        # A target that lost data after FLIP (it restarted, failed over) must not take the source's
        # copy of that data with it: keys only the source holds are kept (docs/protocol.md).
        lost = (self.state.get("authorityChanged") or {}).get("side") == "target"
        if lost:
            self.emit({"event": "rollback_restores", "reason": "the target changed after FLIP: keys only the "
                       "source holds are kept, not deleted"})
        await self._repair_retrying(keep_extra=lost)
        # A rollback is not timed by the applications' patience but by the target's: at least a second.
        budget = max(self.opts.max_write_pause, 1.0)
        for attempt in range(1, self.opts.cutover_attempts + 1):
            done = await self._switch_authority(_Switch(
                to=self.source_ep, back=self.target_ep, authoritative="target", reverse_after=False,
                budget=budget, drain_limit=budget, last_check=not lost, on_flipped=self._flipped_back))
            if done.ok:
                self.emit({"event": "rolled_back", "pause_ms": done.pause_ms, "attempt": attempt,
                           "held_keys": done.held_keys, "key_pause_ms": done.key_pause_ms})
                self.set_phase(Phase.ROLLED_BACK)
                return
            reason = f"flip failed: {done.reason}" if done.flip_failed else done.reason
            self.emit({"event": "rollback_aborted", "attempt": attempt, "reason": reason,
                       "held_keys": done.held_keys})
            if self.syncer.repair_reason:
                await self._repair_retrying(keep_extra=lost)
            await asyncio.sleep(0.2 * attempt)
        raise DurableCacheError("rollback could not drain the reverse backlog; the target stays authoritative")

    def _flipped_back(self) -> None:
        """The source is authoritative again; a change the target went through no longer matters."""
        self.state["flipped"] = False
        self.state.pop("authorityChanged", None)

    async def _rollback_gate(self) -> None:
        """The RouteIn gate on the target, tried again while the target cannot be reached (it may be
        restarting: the rollback is what is wanted then), within the gate timeout."""
        assert self.target
        deadline = time.monotonic() + self.opts.gate_timeout
        for attempt in range(1, 1 << 30):
            try:
                await wait_for_gate(self.target, self.opts.allow_clients, self.opts.gate_settle,
                                    max(1.0, deadline - time.monotonic()),
                                    on_blocked=lambda c: self.emit({"event": "gate_blocked", "clients": c}))
                return
            except ConnectError as exc:
                if time.monotonic() >= deadline:
                    raise
                self.emit({"event": "rollback_waits", "attempt": attempt, "reason": str(exc)})
                await asyncio.sleep(min(0.5 * attempt, 5.0))

    async def _wait_any(self, *events: asyncio.Event, task: asyncio.Task[Any] | None = None) -> None:
        waits = [asyncio.create_task(e.wait()) for e in events] + ([task] if task else [])
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits[: len(events)]:
                w.cancel()

    async def _shutdown(self) -> None:
        await self.readiness.stop()
        await self.lag.close()
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.trust:
            await self.trust.close()
        for p in self.proxies:
            try:
                await p.stop()
            except Exception as exc:  # noqa: BLE001 - shutting down: report and go on
                log.warning("proxy stop failed", error=str(exc))
        if self.syncer:
            await self.syncer.stop()
            await self.syncer.close_pools(current=True)


@dataclasses.dataclass(frozen=True)
class _Switch:
    """One switch of authority: the cutover's (to the target) or the rollback's (back to the source)."""

    to: Endpoint                  # the side that becomes authoritative
    back: Endpoint                # the side that is now
    authoritative: str            # "source" or "target": the side that is now, for the last check
    reverse_after: bool           # the syncer's direction afterwards: target -> source
    budget: float                 # seconds writes may be frozen
    drain_limit: float            # seconds the DRAIN may take inside them (also: hot keys take half)
    last_check: bool              # compare both sides' identities and key counts before FLIP
    on_flipped: Callable[[], None]


@dataclasses.dataclass(frozen=True)
class _Switched:
    ok: bool
    reason: str                   # why an attempt aborted
    pause_ms: float
    frozen_ms: float
    held_keys: int
    key_pause_ms: float
    flip_failed: bool = False
    over_budget: bool = False     # a proxy refused the attempt: the connection budget (PREPARE)
    steps_ms: dict[str, float] = dataclasses.field(default_factory=dict)   # freeze, drain, check, flip, unfreeze


def _no_marks(db: int, keys: list[bytes]) -> None:
    """The proxies' marks once the migration is over: nobody copies them."""


def _ms_since(t: float | None) -> float:
    """Milliseconds since monotonic time ``t``, rounded for events and status; 0.0 if it never began."""
    return round((time.monotonic() - t) * 1000, 2) if t is not None else 0.0


class _SubStore:
    """Keeps the bulk copy's checkpoint inside the migration state."""

    def __init__(self, migration: Migration, key: str):
        self.m = migration
        self.key = key

    def load(self) -> dict[str, Any]:
        return dict(self.m.state.get(self.key, {}))

    def save(self, state: dict[str, Any]) -> None:
        self.m.state[self.key] = state
        self.m.save()


class _EmitProgress(JsonProgress):
    """Copy progress as migration events; the total also goes into the state for status()."""

    def __init__(self, migration: Migration):
        super().__init__(sink=migration.emit)
        self.m = migration

    def start(self, total_keys: int) -> None:
        super().start(total_keys)
        self.m.state["keysTotal"] = total_keys
