"""Pieces shared by the engine's subcommands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

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


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    with contextlib.suppress(ImportError):
        import uvloop  # optional: faster event loop where installed

        return uvloop.run(coro)  # type: ignore[no-any-return]
    return asyncio.run(coro)
