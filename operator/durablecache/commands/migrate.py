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

from .. import fleettls
from ..checkpoint import CheckpointStore, FileCheckpoint, MemoryCheckpoint
from ..control import ControlServer
from ..errors import UsageError
from ..fleet import Fleet
from ..migration import Emit, MarkCallback, Migration, ProxyHandle, ProxyStarter
from ..options import DEFAULTS, MigrationOptions, format_duration, parse_duration
from ..phases import SUCCESSFUL_ENDS, Phase
from ..proxyhandles import local_proxies, subprocess_proxies
from ..urls import Endpoint
from . import proxy as proxy_cmd
from ._common import add_password_arguments, hostport, read_token, run_async, side_endpoint

NAME = "migrate"
HELP = "migrate --source to --target live: proxy at --listen, copy, sync, cut over with a sub-second pause"


def duration(value: str) -> float:
    """An argparse type: options.parse_duration, its error as argparse's own."""
    try:
        return parse_duration(value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    p.add_argument("--cutover", choices=["auto", "manual"], default=DEFAULTS.cutover,
                   help="manual waits for `durablecache control approve` (or POST /approve on --control)")
    p.add_argument("--max-write-pause", type=duration, default=DEFAULTS.max_write_pause, metavar="DUR",
                   help=f"the longest writes may be held at cutover (default {_dur(DEFAULTS.max_write_pause)})")
    p.add_argument("--drain-budget", type=duration, default=None, metavar="DUR",
                   help="the longest the cutover's DRAIN step may take inside --max-write-pause: an attempt "
                        "that cannot drain within it aborts sooner (default: whatever FREEZE left of "
                        "--max-write-pause)")
    p.add_argument("--max-key-pause", type=duration, default=DEFAULTS.max_key_pause, metavar="DUR",
                   help="the longest writes to a hot big key (one too slow to copy inside --max-write-pause) "
                        "may be held before the cutover's global freeze; other keys are not held "
                        f"(default {_dur(DEFAULTS.max_key_pause)})")
    p.add_argument("--rollback-window", type=duration, default=DEFAULTS.rollback_window, metavar="DUR",
                   help="how long reverse sync keeps the source current after cutover "
                        f"(default {_dur(DEFAULTS.rollback_window)})")
    p.add_argument("--exit-after-cutover", action="store_true", help="stop after cutover instead of proxying on")
    p.add_argument("--after-cutover", choices=["proxy", "target"], default=DEFAULTS.after_cutover,
                   help="once the migration is Complete (or RolledBack): proxy keeps the proxy serving as a plain "
                        "front end, no marks, no syncer, also when rerun with --state-file (standalone-mode "
                        "applications keep working against a cluster-mode target); target stops it and exits "
                        f"(default {DEFAULTS.after_cutover})")
    p.add_argument("--state-file", metavar="PATH", help="persist the phase and copy checkpoint; resume from it")
    p.add_argument("--proxy-mode", choices=["inprocess", "subprocess"], default="inprocess",
                   help="run the proxy in this process or as a supervised child process")
    p.add_argument("--proxies", type=int, choices=[0, 1], default=1,
                   help="proxies this command starts itself at --listen (default 1); 0: only proxies that join "
                        "--coordinator-listen (docs/ha.md)")
    p.add_argument("--coordinator-listen", metavar="HOST:PORT",
                   help="accept proxies started elsewhere (`durablecache proxy --join`) on this address, and "
                        "drive them with the ones started here (needs --join-token-file; docs/ha.md)")
    p.add_argument("--join-token-file", metavar="PATH",
                   help="the fleet's shared token: joining proxies present it, and it is their admin API's token")
    fleettls.add_arguments(p, "the joins and marks of --coordinator-listen, and the joined proxies' admin APIs")
    p.add_argument("--epoch", type=int, default=DEFAULTS.epoch, metavar="N",
                   help="this coordinator's fencing epoch: proxies that have seen a newer one refuse its "
                        "instructions (default 0; the operator sets it from its Lease)")
    p.add_argument("--connection-budget", type=proxy_cmd._budget, default=DEFAULTS.connection_budget, metavar="N",
                   help="the proxies started here refuse a cutover attempt that would take a server of the side "
                        "it flips to past N client connections (docs/limits.md; joined proxies take their own "
                        "--connection-budget); 0 (the default): 90%% of that server's maxclients")
    p.add_argument("--control", metavar="HOST:PORT", help="serve the control API (status/approve/rollback)")
    p.add_argument("--control-token-file", metavar="PATH", help="bearer token for --control (created if missing)")
    p.add_argument("--allow-client", action="append", default=[], metavar="NAME|HOST",
                   help="a known read-only client the RouteIn gate may ignore (repeatable)")
    p.add_argument("--gate-settle", type=duration, default=DEFAULTS.gate_settle, metavar="DUR",
                   help="RouteIn gate: how long no client but the proxy (and --allow-client) may be seen on the "
                        "source before the copy starts (also on the target before a rollback; "
                        f"default {_dur(DEFAULTS.gate_settle)})")
    p.add_argument("--gate-timeout", type=duration, default=DEFAULTS.gate_timeout, metavar="DUR",
                   help="RouteIn gate: stop with an error naming the clients still connected if the gate has not "
                        f"passed within this time (default {_dur(DEFAULTS.gate_timeout)})")
    p.add_argument("--max-ops", type=float, metavar="N", help="at most N commands/s on the source while copying")
    p.add_argument("--repair-max-share", type=share, default=DEFAULTS.repair_max_share, metavar="FRACTION",
                   help="a verify-and-repair that would delete or overwrite more than this share of the side it "
                        f"writes stops and asks (default {DEFAULTS.repair_max_share:g}); the authoritative side "
                        "may be the one that lost data")
    p.add_argument("--accept-destructive-repair", action="store_true",
                   help="let such repairs go ahead without asking (or accept one with `control accept-repair`)")
    p.add_argument("--json", action="store_true", help="one JSON object per line for every event")


def run(args: argparse.Namespace) -> int:
    phase = run_async(migrate(args))
    return 0 if phase in SUCCESSFUL_ENDS else 1


def printer(as_json: bool) -> Emit:
    def emit(event: dict[str, Any]) -> None:
        if as_json:
            sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
        else:
            kind = event.get("event")
            rest = " ".join(f"{k}={v}" for k, v in event.items() if k != "event")
            sys.stdout.write(f"{kind}: {rest}\n")
        sys.stdout.flush()

    return emit


def options(args: argparse.Namespace) -> MigrationOptions:
    """The flags as MigrationOptions (which check themselves: OptionError names the flag)."""
    return MigrationOptions(cutover=args.cutover, max_write_pause=args.max_write_pause,
                            drain_budget=args.drain_budget, max_key_pause=args.max_key_pause,
                            rollback_window=args.rollback_window, exit_after_cutover=args.exit_after_cutover,
                            after_cutover=args.after_cutover,
                            allow_clients=args.allow_client, gate_settle=args.gate_settle,
                            gate_timeout=args.gate_timeout, max_source_ops=args.max_ops,
                            repair_max_share=args.repair_max_share,
                            accept_destructive_repair=args.accept_destructive_repair, epoch=args.epoch,
                            connection_budget=args.connection_budget)


async def migrate(args: argparse.Namespace) -> Phase:
    """Run the protocol from the command line's flags."""
    opts = options(args)
    source, target = side_endpoint(args, "source"), side_endpoint(args, "target")
    host, port = hostport(args.listen, "--listen")
    emit = printer(args.json)
    fleet = None
    if args.coordinator_listen:
        fhost, fport = hostport(args.coordinator_listen, "--coordinator-listen")
        fleet = Fleet(read_token(args.join_token_file, "--coordinator-listen"), epoch=opts.epoch, host=fhost,
                      port=fport, emit=emit, tls=fleettls.from_flags(args.fleet_tls_cert, args.fleet_tls_key))
    elif args.proxies == 0:
        raise UsageError("--proxies 0 needs --coordinator-listen: without either, nothing would serve clients")
    elif args.fleet_tls_cert or args.fleet_tls_key:
        raise UsageError("--fleet-tls-cert goes with --coordinator-listen (the channels it secures)")
    starter, owned = proxy_starter(host, port, args.proxy_mode, emit, epoch=opts.epoch, fleet=fleet,
                                   spawn=args.proxies > 0, connection_budget=opts.connection_budget)
    store: CheckpointStore = FileCheckpoint(args.state_file) if args.state_file else MemoryCheckpoint()
    m = Migration(source, target, opts, starter, emit=emit, store=store)
    control = None
    if args.control:
        chost, cport = hostport(args.control, "--control")
        control = ControlServer(m, _token(args.control_token_file), chost, cport)
        await control.start()
        emit({"event": "control", "address": f"{chost}:{control.port}"})
    try:
        return await drive(m, owned)
    finally:
        if control:
            await control.stop()


def proxy_starter(host: str, port: int, mode: str, emit: Emit, *, epoch: int = 0, fleet: Fleet | None = None,
                  spawn: bool = True, connection_budget: int = 0) -> tuple[ProxyStarter, list[Any]]:
    """How the migration starts its proxies (in this process, or supervised children; and/or a fleet
    of proxies that join) and what must be stopped at the end. ``connection_budget`` reaches the
    proxies started here (a joined proxy has its own flag)."""
    owned: list[Any] = []
    own: ProxyStarter | None = None
    if spawn and mode == "subprocess":
        budget = ["--connection-budget", str(connection_budget)] if connection_budget else []
        own, owned = subprocess_proxies(host, port, emit, proxy_args=budget, epoch=epoch)
    elif spawn:
        own = local_proxies(host, port, connection_budget=connection_budget)
    return with_fleet(own, fleet), owned


def with_fleet(own: ProxyStarter | None, fleet: Fleet | None) -> ProxyStarter:
    """The proxies started here (``own``) and/or the ``fleet`` of proxies that join, as one starter."""
    if fleet is None:
        assert own is not None, "no proxy started here and no fleet to join"
        return own

    async def start(upstream: Endpoint, on_marks: MarkCallback, on_lost: Callable[[str], None]) -> list[ProxyHandle]:
        handles = await own(upstream, on_marks, on_lost) if own is not None else []
        await fleet.start(upstream, on_marks, on_lost)
        return [*handles, fleet]

    return start


async def drive(m: Migration, owned: list[Any]) -> Phase:
    """Run ``m`` until it ends or SIGTERM/SIGINT asks it to stop (the CLI and the operator's worker)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, m.stop_requested.set)
    task = asyncio.create_task(m.run())
    stop = asyncio.create_task(m.stop_requested.wait())
    try:
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            # SIGTERM before the end: stop cleanly; the saved state lets a rerun resume.
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


def _dur(seconds: float) -> str:
    return format_duration(seconds)


def _token(path: str | None) -> str:
    """The control API's token: read from its file, which is created (owner-only) when missing."""
    if path and not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # a bearer token: owner only
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
    return read_token(path, "--control")
