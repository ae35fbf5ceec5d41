"""durablecache migrate: the whole protocol locally — proxy, syncer, copy, cutover."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
from collections.abc import Callable
from typing import Any

from ..checkpoint import CheckpointStore, FileCheckpoint, MemoryCheckpoint
from ..control import ControlServer
from ..errors import UsageError
from ..migration import Migration, MigrationOptions, Phase
from ..proxyhandles import local_proxies, subprocess_proxies
from ._common import add_password_arguments, hostport, read_token, run_async, side_endpoint

NAME = "migrate"
HELP = "migrate --source to --target live: proxy at --listen, copy, sync, cut over with a sub-second pause"


def duration(value: str) -> float:
    """'100ms', '2s', '30m', '1h' or plain seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(value[: -len(suffix)]) * units[suffix]
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {value!r} (use e.g. 100ms, 2s, 30m)") from None


def share(value: str) -> float:
    """A fraction between 0 and 1, or a percentage ('5%')."""
    try:
        x = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        x = -1.0
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"not a share between 0 and 1 (or 0% and 100%): {value!r}")
    return x


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, metavar="URL",
                   help="the live, authoritative keyspace: valkey[s]://[user[:pass]@]host:port (a password in the URL "
                        "shows in `ps`: prefer --source-password-file)")
    p.add_argument("--target", required=True, metavar="URL", help="the new (durable) keyspace, same form")
    add_password_arguments(p)
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="where applications connect (the proxy)")
    p.add_argument("--cutover", choices=["auto", "manual"], default="auto",
                   help="manual waits for `durablecache control approve` (or POST /approve on --control)")
    p.add_argument("--max-write-pause", type=duration, default=0.1, metavar="DUR",
                   help="the longest writes may be held at cutover (default 100ms)")
    p.add_argument("--drain-budget", type=duration, default=None, metavar="DUR",
                   help="the longest the cutover's DRAIN step may take inside --max-write-pause: an attempt "
                        "that cannot drain within it aborts sooner (default: whatever FREEZE left of "
                        "--max-write-pause)")
    p.add_argument("--max-key-pause", type=duration, default=5.0, metavar="DUR",
                   help="the longest writes to a hot big key (one too slow to copy inside --max-write-pause) "
                        "may be held before the cutover's global freeze; other keys are not held (default 5s)")
    p.add_argument("--rollback-window", type=duration, default=1800.0, metavar="DUR",
                   help="how long reverse sync keeps the source current after cutover (default 30m)")
    p.add_argument("--exit-after-cutover", action="store_true", help="stop after cutover instead of proxying on")
    p.add_argument("--state-file", metavar="PATH", help="persist the phase and copy checkpoint; resume from it")
    p.add_argument("--proxy-mode", choices=["inprocess", "subprocess"], default="inprocess",
                   help="run the proxy in this process or as a supervised child process")
    p.add_argument("--control", metavar="HOST:PORT", help="serve the control API (status/approve/rollback)")
    p.add_argument("--control-token-file", metavar="PATH", help="bearer token for --control (created if missing)")
    p.add_argument("--allow-client", action="append", default=[], metavar="NAME|HOST",
                   help="a known read-only client the RouteIn gate may ignore (repeatable)")
    p.add_argument("--gate-settle", type=duration, default=2.0, metavar="DUR",
                   help="RouteIn gate: how long no client but the proxy (and --allow-client) may be seen on the "
                        "source before the copy starts (also on the target before a rollback; default 2s)")
    p.add_argument("--gate-timeout", type=duration, default=300.0, metavar="DUR",
                   help="RouteIn gate: stop with an error naming the clients still connected if the gate has not "
                        "passed within this time (default 300s)")
    p.add_argument("--max-ops", type=float, metavar="N", help="at most N commands/s on the source while copying")
    p.add_argument("--repair-max-share", type=share, default=0.05, metavar="FRACTION",
                   help="a verify-and-repair that would delete or overwrite more than this share of the side it "
                        "writes stops and asks (default 0.05); the authoritative side may be the one that lost data")
    p.add_argument("--accept-destructive-repair", action="store_true",
                   help="let such repairs go ahead without asking (or accept one with `control accept-repair`)")
    p.add_argument("--json", action="store_true", help="one JSON object per line for every event")


def run(args: argparse.Namespace) -> int:
    phase = run_async(migrate(args))
    return 0 if phase in (Phase.COMPLETE, Phase.ROUTE_OUT, Phase.ROLLED_BACK) else 1


def printer(as_json: bool):  # type: ignore[no-untyped-def]
    def emit(event: dict[str, Any]) -> None:
        if as_json:
            sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
        else:
            kind = event.get("event")
            rest = " ".join(f"{k}={v}" for k, v in event.items() if k != "event")
            sys.stdout.write(f"{kind}: {rest}\n")
        sys.stdout.flush()

    return emit


async def migrate(args: argparse.Namespace, store: CheckpointStore | None = None,
                  emit: Callable[[dict[str, Any]], None] | None = None) -> Phase:
    """Run the protocol; `store` and `emit` let another runtime (the operator's worker) keep the state
    elsewhere and see every event."""
    source, target = side_endpoint(args, "source"), side_endpoint(args, "target")
    host, port = hostport(args.listen, "--listen")
    if args.drain_budget is not None and args.drain_budget > args.max_write_pause:
        raise UsageError(f"--drain-budget ({args.drain_budget * 1000:g} ms) must not exceed --max-write-pause "
                         f"({args.max_write_pause * 1000:g} ms): the drain happens inside the write pause")
    emit = emit or printer(args.json)
    owned: list[Any] = []
    if args.proxy_mode == "subprocess":
        starter, owned = subprocess_proxies(host, port, emit)
    else:
        starter = local_proxies(host, port)
    opts = MigrationOptions(cutover=args.cutover, max_write_pause=args.max_write_pause,
                            drain_budget=args.drain_budget, max_key_pause=args.max_key_pause,
                            rollback_window=args.rollback_window, exit_after_cutover=args.exit_after_cutover,
                            allow_clients=args.allow_client, gate_settle=args.gate_settle,
                            gate_timeout=args.gate_timeout, max_source_ops=args.max_ops,
                            repair_max_share=args.repair_max_share,
                            accept_destructive_repair=args.accept_destructive_repair,
                            target_lag=getattr(args, "target_lag", None))   # the worker's (aws): laggovernor.py
    if store is None:
        store = FileCheckpoint(args.state_file) if args.state_file else MemoryCheckpoint()
    m = Migration(source, target, opts, starter, emit=emit, store=store)
    control = None
    if args.control:
        chost, cport = hostport(args.control, "--control")
        control = ControlServer(m, _token(args.control_token_file), chost, cport)
        await control.start()
        emit({"event": "control", "address": f"{chost}:{control.port}"})
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, m.stop_requested.set)
    task = asyncio.create_task(m.run())
    stop = asyncio.create_task(m.stop_requested.wait())
    try:
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            # SIGTERM before the end: stop cleanly; the state file lets a rerun resume.
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return m.phase
        return task.result()
    finally:
        stop.cancel()
        for thing in owned:
            await thing.stop()
        if control:
            await control.stop()


def _token(path: str | None) -> str:
    """The control API's token: read from its file, which is created (owner-only) when missing."""
    if path and not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # a bearer token: owner only
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
    return read_token(path, "--control")
