"""structlog set-up: JSON lines for the operator and proxy, key=value on a terminal.

Secrets never reach a log line: endpoints are logged through ``Endpoint.redacted()`` and the
``redact_secrets`` processor blanks any field whose name says it holds one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SECRET_WORDS = ("password", "token", "secret", "auth")


def redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key != "event" and any(w in key.lower() for w in SECRET_WORDS):
            event[key] = "***"
    return event


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written, not when logging was configured: a stream
    replaced and closed meanwhile (a test harness capturing output, a daemon redirecting it) must not
    make every later log call raise — least of all in the middle of the protocol."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(json: bool = False, level: str = "info") -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"])
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get(name: str = "durablecache") -> Any:
    return structlog.get_logger(name)
