"""Errors that reach a user as one clear line (never a traceback)."""

from __future__ import annotations


class DurableCacheError(Exception):
    """A failure the user can act on; its message is shown as it is."""

    exit_code = 2


class UsageError(DurableCacheError):
    """The request itself is wrong (malformed URL, contradictory options)."""


class ConnectError(DurableCacheError):
    """A server could not be reached or refused our credentials."""


class RefusedError(DurableCacheError):
    """A safety check refused to go on (non-empty target, source == target)."""


class ServerError(DurableCacheError):
    """A server answered a command with an error we cannot work around."""


class FencedError(RuntimeError):
    """A proxy refused an instruction because it has seen a newer coordinator epoch (docs/ha.md).

    Not a DurableCacheError on purpose: an attempt that meets it must not be retried, and the
    migration must not record a phase (the newer coordinator owns the state): it stops acting."""
