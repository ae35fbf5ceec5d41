"""A migration's phases: one type for the engine, the operator, the worker, the status and the metrics.

The engine (migration.py) runs RouteIn onwards. Preflight and Provision belong to the operator alone
(checking the spec and creating the durable target happen before any worker exists); the CLI has no
such phases, since its target exists already.
"""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    PREFLIGHT = "Preflight"
    PROVISION = "Provision"
    ROUTE_IN = "RouteIn"
    COPY = "Copy"
    SYNC = "Sync"
    CUTOVER = "Cutover"
    ROUTE_OUT = "RouteOut"
    COMPLETE = "Complete"
    FAILED = "Failed"
    ROLLING_BACK = "RollingBack"
    ROLLED_BACK = "RolledBack"


# Set by the operator (k8s/handlers.py) before the worker starts; never by the engine.
OPERATOR_PHASES = frozenset({Phase.PREFLIGHT, Phase.PROVISION})
# The engine's forward path; RollingBack/RolledBack/Failed branch off it.
ENGINE_ORDER = (Phase.ROUTE_IN, Phase.COPY, Phase.SYNC, Phase.CUTOVER, Phase.ROUTE_OUT, Phase.COMPLETE)
FINAL_PHASES = frozenset({Phase.COMPLETE, Phase.FAILED, Phase.ROLLED_BACK})
# Phases in which the applications write through the proxy.
PROXIED_PHASES = frozenset({Phase.ROUTE_IN, Phase.COPY, Phase.SYNC, Phase.CUTOVER, Phase.ROLLING_BACK})
# A run that ends in one of these did what it was asked (a CLI exit status of 0).
SUCCESSFUL_ENDS = frozenset({Phase.COMPLETE, Phase.ROUTE_OUT, Phase.ROLLED_BACK})
# A manual cutover can be approved ahead of time, from RouteIn on, until it starts.
APPROVABLE_PHASES = frozenset({Phase.ROUTE_IN, Phase.COPY, Phase.SYNC})


def phase_or_none(value: object) -> Phase | None:
    """A phase read from a status or a state file; None when absent or not a phase name."""
    try:
        return Phase(str(value)) if value else None
    except ValueError:
        return None
