"""The migration's resume state kept in the DurableCache's status.checkpoint.migration.

The engine calls ``save`` from its event loop, often (every copy checkpoint). Saves that decide who is
authoritative — a phase change, ``flipped`` — are written before ``save`` returns: the engine unfreezes
writes right after it persists ``flipped``, so a worker killed a moment later must find the flip in the
status, or a restart would treat the old side as authoritative and lose the writes made since. Every
other save (copy cursors, counters) is coalesced and written by a background thread at most every
``interval`` seconds: a restart that resumes from a slightly older cursor only re-copies some keys.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

from .. import logs
from .kube import Kube
from .status import OPERATOR_PHASES, conditions_for, merge_diff

log = logs.get("durablecache.k8s.store")
CRITICAL_KEYS = ("phase", "flipped", "message")

PhaseHook = Callable[[str, dict[str, Any]], None]


class StatusStore:
    def __init__(self, kube: Kube, namespace: str, name: str, *, interval: float = 1.0,
                 on_phase: PhaseHook | None = None):
        self.kube = kube
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

    @property
    def phase(self) -> str | None:
        """The phase last written (or loaded)."""
        return self._written.get("phase")

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

    # -- writing --------------------------------------------------------------------------------
    def _write(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._pending = None
            diff = merge_diff(self._written, state)
            if not diff and self._written:
                return
            phase = state.get("phase")
            phase_changed = phase != self._written.get("phase")
            patch: dict[str, Any] = {"checkpoint": {"migration": diff if self._written else state}}
            if phase_changed and phase and phase not in OPERATOR_PHASES:
                # Preflight/Provision are the operator's own phases; the engine repeats them when it
                # starts, which must not make the visible phase go backwards.
                self.conditions = conditions_for(phase, state.get("message", ""), self.generation, self.conditions)
                patch.update(phase=phase, conditions=self.conditions)
            self.kube.patch_status(self.namespace, self.name, patch)
            self._written = state
        if phase_changed and phase and self.on_phase:
            self.on_phase(phase, state)

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
