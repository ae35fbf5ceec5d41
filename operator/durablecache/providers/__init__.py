"""Where the durable target comes from: ``aws`` (creates it on ElastiCache) or ``static`` (given endpoints).

The migration protocol only talks to ``Provider`` (see ``base``); ``rules`` holds the durability
preflight as pure functions. ``aws`` is imported lazily so that code using only the static provider
does not pay for importing boto3.
"""

from __future__ import annotations

from .base import (
    OWNER_TAG,
    Advice,
    DeletionOutcome,
    PlannedTarget,
    PreflightResult,
    Provider,
    SourceDescription,
    TargetInfo,
    TargetSpec,
    Violation,
)
from .static import StaticProvider

__all__ = [
    "OWNER_TAG",
    "Advice",
    "DeletionOutcome",
    "PlannedTarget",
    "PreflightResult",
    "Provider",
    "SourceDescription",
    "StaticProvider",
    "TargetInfo",
    "TargetSpec",
    "Violation",
]
