"""Pieces shared by the engine's subcommands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ..errors import UsageError
from ..topology import Topology, discover
from ..urls import parse_url

T = TypeVar("T")


def add_pair_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, metavar="URL",
                   help="valkey[s]://[user:pass@]host:port[/db] (any node of a cluster)")
    p.add_argument("--target", required=True, metavar="URL", help="same form as --source")
    p.add_argument("--json", action="store_true", help="print JSON lines (progress, then one summary object)")


async def discover_pair(args: argparse.Namespace) -> tuple[Topology, Topology]:
    src_ep, dst_ep = parse_url(args.source), parse_url(args.target)
    return await discover(src_ep), await discover(dst_ep)


def hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"{what} must be HOST:PORT, not {value!r}")
    return host or "127.0.0.1", int(port)


def read_token(path: str | None, what: str) -> str:
    """A bearer token from its file (one line); a one-line error when it is missing or empty."""
    if not path:
        raise UsageError(f"{what} needs its token file")
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read {what} token file {path}: {exc.strerror}") from None
    if not token:
        raise UsageError(f"{what} token file {path} is empty")
    return token


# The proxy allocates a few short-lived container objects per request; with the default threshold
# (700) the young generation was collected hundreds of times a second, about 2% of the proxy's CPU at
# full load. Its cycles (a session and its upstream connections) are few and small.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Collect the young generation less often, and never re-scan what exists at start-up."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    gc.freeze()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    tune_gc()
    with contextlib.suppress(ImportError):
        import uvloop  # optional: faster event loop where installed

        return uvloop.run(coro)  # type: ignore[no-any-return]
    return asyncio.run(coro)
