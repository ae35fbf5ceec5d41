"""What the DurableCache's status says: phase, the Ready/Progressing/Degraded conditions and progress.

Pure functions (no API calls) so the operator and the worker compute the same status the same way.
"""

from __future__ import annotations

from typing import Any

from ..phases import Phase
from .kube import now_iso

# phase -> (Progressing reason, message). Reasons are CamelCase, stable, and documented in docs/operator.md.
PROGRESSING: dict[Phase, tuple[str, str]] = {
    Phase.PREFLIGHT: ("Preflight", "checking the spec, the source and the durability rules"),
    Phase.PROVISION: ("Provisioning", "creating or adopting the durable target"),
    Phase.ROUTE_IN: ("RoutingIn", "applications are being moved onto the proxy; waiting until nothing writes "
                             "around it"),
    Phase.COPY: ("Copying", "copying every key from the source to the target"),
    Phase.SYNC: ("Syncing", "keeping the target in sync with live writes"),
    Phase.CUTOVER: ("CuttingOver", "holding writes while the target becomes authoritative"),
    Phase.ROUTE_OUT: ("RoutingOut", "applications use the target; the source is kept current for the rollback window"),
    Phase.ROLLING_BACK: ("RollingBack", "moving applications back to the source"),
}


def condition(type_: str, status: bool, reason: str, message: str, generation: int | None,
              previous: list[dict[str, Any]]) -> dict[str, Any]:
    """One condition; lastTransitionTime moves only when the status value changes."""
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == value else None
    out = {"type": type_, "status": value, "reason": reason, "message": message[:4000],
           "lastTransitionTime": since or now_iso()}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def conditions_for(phase: Phase, message: str, generation: int | None, previous: list[dict[str, Any]], *,
                   awaiting_approval: bool = False, failure_reason: str = "MigrationFailed",
                   degraded: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded for a phase.

    ``degraded`` = (reason, message) marks a non-fatal problem (a worker restart, a required repair)."""
    if phase == Phase.COMPLETE:
        ready = (True, "MigrationComplete", message or "applications use the durable target")
        progressing = (False, "MigrationComplete", "nothing left to do")
    elif phase == Phase.ROLLED_BACK:
        ready = (False, "RolledBack", message or "applications are back on the source")
        progressing = (False, "RolledBack", "nothing left to do")
    elif phase == Phase.FAILED:
        ready = (False, failure_reason, message)
        progressing = (False, failure_reason, message)
    else:
        reason, text = PROGRESSING.get(phase, (phase.value, phase.value))
        if awaiting_approval and phase == Phase.SYNC:
            reason, text = "AwaitingApproval", "in sync; set spec.cutover.approved=true to cut over"
        ready = (False, reason, text)
        progressing = (True, reason, message or text)
    if phase == Phase.FAILED:
        bad = (True, failure_reason, message)
    elif degraded:
        bad = (True, degraded[0], degraded[1])
    else:
        bad = (False, "AsExpected", "no problem detected")
    return [condition("Ready", *ready, generation, previous),
            condition("Progressing", *progressing, generation, previous),
            condition("Degraded", *bad, generation, previous)]


def progress(keys_copied: int, keys_total: int, phase: Phase) -> dict[str, Any]:
    """status.progress; past Copy the bulk copy is done whatever the counters say."""
    if phase in (Phase.PREFLIGHT, Phase.PROVISION, Phase.ROUTE_IN):
        percent = 0
    elif phase == Phase.COPY:
        percent = min(99, keys_copied * 100 // keys_total) if keys_total else 0
    else:
        percent = 100
    return {"percent": percent, "display": f"{percent}%", "keysCopied": max(0, int(keys_copied)),
            "keysTotal": max(0, int(keys_total))}


def merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch that turns ``old`` into ``new`` (None deletes a key)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        if key not in old:
            out[key] = value
        elif old[key] != value:
            out[key] = merge_diff(old[key], value)
    return out
