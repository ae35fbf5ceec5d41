"""The worker's one writer of the DurableCache's status: the engine's resume state
(status.checkpoint.migration), the phase, the conditions and the top-level observedGeneration, progress
and checkpoint.worker. The operator writes only what comes before the worker (k8s/handlers.py).

The engine calls ``save`` from its event loop, often (every copy checkpoint). Saves that decide who is
authoritative — a phase change, ``flipped`` — are written before ``save`` returns: the engine unfreezes
writes right after it persists ``flipped``, so a worker killed a moment later must find the flip in the
status, or a restart would treat the old side as authoritative and lose the writes made since. Every
other save (copy cursors, counters) is coalesced and written by a background thread at most every
``interval`` seconds: a restart that resumes from a slightly older cursor only re-copies some keys.

``fence`` (the coordinator lease's ``valid``, k8s/lease.py) is asked before every write: a worker whose
lease ran out raises ``LeaseLost`` instead of writing, so a deposed coordinator never overwrites what
its successor wrote, and an engine step that needs its save persisted (the flip) does not go on.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

from .. import logs
from ..phases import Phase, phase_or_none
from .kube import Kube
from .lease import LeaseLost
from .status import conditions_for, merge_diff

log = logs.get("durablecache.k8s.store")
CRITICAL_KEYS = ("phase", "flipped", "message")
UNCHANGED = "\0unchanged"   # set_flags: leave repair_blocked as it is

PhaseHook = Callable[[Phase, dict[str, Any]], None]
Fence = Callable[[], bool]


class StatusStore:
    def __init__(self, kube: Kube, namespace: str, name: str, *, interval: float = 1.0,
                 on_phase: PhaseHook | None = None, fence: Fence | None = None):
        self.kube = kube
        self.fence = fence
        self.namespace, self.name = namespace, name
        self.interval = interval
        self.on_phase = on_phase
        self._written: dict[str, Any] = {}
        self._pending: dict[str, Any] | None = None
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.generation: int | None = None
        self.conditions: list[dict[str, Any]] = []
        self.awaiting_approval = False
        self.repair_blocked: str | None = None     # the message of a repair waiting for acceptance
        self._reported: dict[str, Any] = {}

    @property
    def phase(self) -> Phase | None:
        """The phase last written (or loaded)."""
        return phase_or_none(self._written.get("phase"))

    # -- CheckpointStore ------------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        obj = self.kube.get(self.namespace, self.name) or {}
        status = obj.get("status") or {}
        self.generation = obj.get("metadata", {}).get("generation")
        self.conditions = list(status.get("conditions") or [])
        state = ((status.get("checkpoint") or {}).get("migration")) or {}
        with self._lock:
            self._written = copy.deepcopy(state)
        return copy.deepcopy(state)

    def save(self, state: dict[str, Any]) -> None:
        snapshot = copy.deepcopy(state)
        critical = any(snapshot.get(k) != self._written.get(k) for k in CRITICAL_KEYS)
        if critical:
            self._write(snapshot)
            return
        with self._lock:
            self._pending = snapshot
        self._ensure_thread()
        self._wake.set()

    # -- the rest of the worker's status ----------------------------------------------------------
    def set_coordinator(self, holder: str, epoch: int) -> None:
        """status.coordinator: who holds the coordinator lease, with which fencing epoch."""
        with self._lock:
            self._patch({"coordinator": {"holder": holder, "epoch": epoch}})

    def report(self, fields: dict[str, Any]) -> None:
        """Progress, backlog and the like: written when they changed."""
        with self._lock:
            changed = {k: v for k, v in fields.items() if self._reported.get(k, object()) != v}
            if not changed:
                return
            self._patch(changed)
            self._reported.update(changed)

    def set_flags(self, *, awaiting_approval: bool | None = None, repair_blocked: str | None = UNCHANGED,
                  generation: int | None = None) -> None:
        """What the conditions show besides the phase (and the generation they were written for);
        the conditions are rewritten when any of them changed."""
        with self._lock:
            before = (self.awaiting_approval, self.repair_blocked, self.generation)
            if awaiting_approval is not None:
                self.awaiting_approval = awaiting_approval
            if repair_blocked is not UNCHANGED:
                self.repair_blocked = repair_blocked or None
            if generation is not None:
                self.generation = generation
            phase = self.phase
            if phase is None or before == (self.awaiting_approval, self.repair_blocked, self.generation):
                return
            self._patch(self._conditions(phase, ""))

    def _conditions(self, phase: Phase, message: str) -> dict[str, Any]:
        degraded = ("RepairBlocked", self.repair_blocked) if self.repair_blocked else None
        self.conditions = conditions_for(phase, message, self.generation, self.conditions,
                                         awaiting_approval=self.awaiting_approval, degraded=degraded)
        out: dict[str, Any] = {"conditions": self.conditions}
        if self.generation is not None:
            out["observedGeneration"] = self.generation
        return out

    # -- writing --------------------------------------------------------------------------------
    def _write(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._pending = None
            diff = merge_diff(self._written, state)
            if not diff and self._written:
                return
            phase = phase_or_none(state.get("phase"))
            phase_changed = phase is not None and phase != self.phase
            patch: dict[str, Any] = {"checkpoint": {"migration": diff if self._written else state}}
            if phase_changed and phase is not None:
                self.awaiting_approval = False
                patch.update(phase=phase.value, **self._conditions(phase, state.get("message", "")))
            self._patch(patch)
            self._written = state
        if phase_changed and phase is not None and self.on_phase:
            self.on_phase(phase, state)

    def _patch(self, status: dict[str, Any]) -> None:
        """Every status write goes through here, behind the fence."""
        if self.fence is not None and not self.fence():
            raise LeaseLost("the coordinator lease is no longer held: status not written")
        self.kube.patch_status(self.namespace, self.name, status)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._flusher, name="status-checkpoint", daemon=True)
            self._thread.start()

    def _flusher(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(timeout=self.interval)
            self._wake.clear()
            self.flush()
            self._closed.wait(self.interval)

    def flush(self) -> None:
        # Take and write under one lock: a critical write in between must never be overwritten by an
        # older coalesced state.
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None:
                return
            try:
                self._write(pending)
            except Exception as exc:  # noqa: BLE001 - a coalesced save is retried with the next one
                self._pending = self._pending or pending
                log.warning("checkpoint not saved", error=str(exc)[:200])

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=5)
        self.flush()
