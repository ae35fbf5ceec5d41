"""``durablecache proxy``: run the dual-write proxy in front of one upstream (standalone or cluster)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
from typing import Any

from .. import fleettls, logs
from ..errors import UsageError
from ..options import DEFAULTS
from ..proxyprocesses import Child, cpu_count, supervise
from ..urls import parse_url
from ._common import hostport, read_token, run_async, tune_gc

NAME = "proxy"
HELP = "run the dual-write RESP proxy: forward clients to the upstream and report every key written"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upstream", default=os.environ.get("DURABLECACHE_UPSTREAM"),
                   help="valkey[s]://[user:pass@]host:port of the authoritative side (default: the "
                        "DURABLECACHE_UPSTREAM environment variable, which keeps a password off the command line)")
    p.add_argument("--listen", default="127.0.0.1:6380", help="HOST:PORT for clients (default 127.0.0.1:6380)")
    p.add_argument("--admin", help="HOST:PORT for the admin API (needs --admin-token-file)")
    p.add_argument("--admin-token-file", help="file holding the admin API's bearer token")
    p.add_argument("--marks-to", help="HOST:PORT of the syncer's mark server (needs --marks-token-file)")
    p.add_argument("--marks-token-file", help="file holding the mark server's token")
    p.add_argument("--join", metavar="HOST:PORT",
                   help="join the coordinator (`durablecache migrate --coordinator-listen`) at HOST:PORT: take the "
                        "upstream and the cutover state from it, send it the marks (needs --join-token-file and "
                        "--admin; docs/ha.md)")
    p.add_argument("--join-token-file", help="file holding the fleet's token (also this proxy's admin API token)")
    p.add_argument("--proxy-id", help="this proxy's name in the fleet (default: host name and process id)")
    fleettls.add_arguments(p, "with --join: the mark channel to the coordinator and this proxy's admin API")
    p.add_argument("--tls-cert", help="serve clients over TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    p.add_argument("--announce", metavar="HOST[:PORT]",
                   help="cluster mode: the host name (and port) CLUSTER SLOTS/SHARDS/NODES name, so that clients "
                        "connect to and verify it (default: the address each client connected to)")
    p.add_argument("--max-clients", type=_positive, default=0, metavar="N",
                   help="accept at most N client connections (per process); more get "
                        "'ERR max number of clients reached', as from a server (default: no limit)")
    p.add_argument("--max-clients-total", type=_positive, default=0, metavar="N",
                   help="accept at most N client connections in all of this command's --processes together, "
                        "an equal share each (with --max-clients too: the smaller of the two per process)")
    p.add_argument("--connection-budget", type=_budget, default=DEFAULTS.connection_budget, metavar="N",
                   help="a cutover attempt is refused when it would take a server of the side it flips to past N "
                        "client connections (its clients now plus one per client session of this process; "
                        "docs/limits.md); 0 (the default): 90%% of that server's maxclients")
    p.add_argument("--processes", type=_processes, default=1, metavar="N|auto",
                   help="run N proxy processes sharing the listen port (SO_REUSEPORT), each with its own "
                        "admin port (--admin PORT, PORT+1, ...) and mark stream; auto: one per CPU (default 1)")
    p.add_argument("--reuse-port", action="store_true",
                   help="listen with SO_REUSEPORT, sharing the port with other proxy processes (--processes "
                        "sets it for its children)")
    p.add_argument("--not-migrating", action="store_true",
                   help="forward FLUSHALL/FLUSHDB/SWAPDB/MOVE instead of refusing them")
    p.add_argument("--name", default="durablecache-proxy", help="prefix of the proxy's upstream client names")
    p.add_argument("--json", action="store_true", help="log JSON lines")
    p.set_defaults(proxy_parser=p)   # --processes rebuilds its children's command lines from it


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {value!r}")
    return int(value)


def _budget(value: str) -> int:
    """--connection-budget: a number of connections, 0 for the default share of maxclients."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"not a number of connections: {value!r}")
    return int(value)


def _processes(value: str) -> int:
    """N, or "auto": one per CPU this process may use."""
    if value == "auto":
        return cpu_count()
    return _positive(value)


def announce_address(value: str, what: str = "--announce") -> tuple[str, int]:
    """HOST or HOST:PORT (port 0: the port the client connected to)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, 0
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{what} must be HOST or HOST:PORT, not {value!r}")
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    if (args.fleet_tls_cert or args.fleet_tls_key) and not args.join:
        raise UsageError("--fleet-tls-cert/--fleet-tls-key go with --join (the channels of a fleet)")
    if args.processes > 1:
        return run_async(_parent(args))
    if args.json:
        logs.configure(json=True, level=getattr(args, "log_level", "info") or "info")
    if os.environ.get("DURABLECACHE_UVLOOP") == "0":  # the stdlib loop, for comparison (bench/proxy.py)
        tune_gc()
        return asyncio.run(_main(args))
    return run_async(_main(args))


async def _main(args: argparse.Namespace) -> int:
    from ..proxy import MarkCallback, Proxy
    from ..proxy.admin import AdminServer
    from ..proxy.marks import RemoteMarks

    log = logs.get("durablecache.proxy")
    if args.join:
        return await _joined(args)
    if not args.upstream:
        raise UsageError("--upstream (or DURABLECACHE_UPSTREAM) is required")
    upstream = parse_url(args.upstream)
    host, port = hostport(args.listen, "--listen")
    admin_addr = hostport(args.admin, "--admin") if args.admin else None
    admin_token = read_token(args.admin_token_file, "--admin") if args.admin else ""
    client_tls = server_tls(args.tls_cert, args.tls_key)
    announce_host, announce_port = announce_address(args.announce) if args.announce else (None, 0)
    remote: RemoteMarks | None = None
    counted = {"keys": 0}

    def count_marks(db: int, keys: list[bytes]) -> None:   # no syncer: count only
        counted["keys"] += len(keys)

    on_marks: MarkCallback = count_marks
    if args.marks_to:
        mhost, mport = hostport(args.marks_to, "--marks-to")
        remote = RemoteMarks(mhost, mport, read_token(args.marks_token_file, "--marks-to"), name=args.name)
        await remote.connect()
        on_marks = remote
    proxy = Proxy(upstream, listen_host=host, listen_port=port, on_marks=on_marks, client_tls=client_tls,
                  migrating=not args.not_migrating, name_prefix=args.name, max_clients=max_clients(args, 1),
                  announce_host=announce_host, announce_port=announce_port, reuse_port=args.reuse_port,
                  connection_budget=args.connection_budget)
    await proxy.start()
    admin = None
    if admin_addr is not None:
        admin = AdminServer(proxy, admin_token, admin_addr[0], admin_addr[1])
        await admin.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    shown = f" (admin {admin_addr[0]}:{admin.port})" if admin is not None and admin_addr is not None else ""
    print(f"durablecache proxy: listening on {host}:{proxy.port} -> {upstream.redacted()}{shown}", flush=True)
    await stop.wait()
    log.info("proxy.stopping", **{k: v for k, v in proxy.stats().items() if k in ("clients", "commands", "writes")})
    if admin is not None:
        await admin.stop()
    await proxy.stop()
    if remote is not None:
        await remote.close()
    return 0


def server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The TLS context clients are served with (--tls-cert/--tls-key), or None for plain TCP."""
    if not (cert or key):
        return None
    if not (cert and key):
        raise UsageError("--tls-cert and --tls-key go together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load --tls-cert {cert} / --tls-key {key}: {exc}") from None
    return ctx


async def _parent(args: argparse.Namespace) -> int:
    """--processes N: N children on one port, supervised (proxyprocesses.py); SIGTERM/SIGINT stop them."""
    if not args.upstream and not args.join:
        raise UsageError("--upstream (or DURABLECACHE_UPSTREAM) is required")
    host, port = hostport(args.listen, "--listen")
    if port == 0:
        raise UsageError("--processes needs a --listen port other than 0: the processes share it")
    if args.max_clients_total and args.max_clients_total < args.processes:
        raise UsageError(f"--max-clients-total {args.max_clients_total} cannot be shared by {args.processes} "
                         "processes: give each at least one")
    server_tls(args.tls_cert, args.tls_key)            # a bad certificate fails here, once
    fleettls.from_flags(args.fleet_tls_cert, args.fleet_tls_key)
    if args.announce:
        announce_address(args.announce)
    # The upstream URL may carry a password: the children get it in the environment, never in argv.
    env = {**os.environ, "DURABLECACHE_UPSTREAM": args.upstream or ""}
    children = [Child(i, child_argv(args, i), env) for i in range(args.processes)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await supervise(children, stop)


def max_clients(args: argparse.Namespace, processes: int) -> int:
    """Each process's client limit (0: none): --max-clients, and its equal share of --max-clients-total."""
    share = args.max_clients_total // processes if args.max_clients_total else 0
    if args.max_clients and share:
        return min(args.max_clients, share)
    return int(args.max_clients or share)


def child_argv(args: argparse.Namespace, index: int) -> list[str]:
    """The command line of child ``index``: the parent's flags as parsed (rebuilt from the parser, so
    every flag of this command is passed on), one process each, a port shared with SO_REUSEPORT, the
    admin API on the parent's admin port + ``index``."""
    out = ["--log-json"] if getattr(args, "log_json", False) else []
    if getattr(args, "log_level", None):
        out += ["--log-level", args.log_level]
    out.append(NAME)
    skip = {"help", "upstream", "processes", "reuse_port", "admin", "proxy_parser", "proxy_id", "max_clients",
            "max_clients_total"}
    for action in args.proxy_parser._actions:
        if not action.option_strings or action.dest in skip:
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:           # store_true and the like
            out.append(flag)
        elif isinstance(value, list):
            for item in value:
                out += [flag, str(item)]
        else:
            out += [flag, str(value)]
    out += ["--processes", "1", "--reuse-port"]
    limit = max_clients(args, args.processes)
    if limit:
        out += ["--max-clients", str(limit)]
    if getattr(args, "proxy_id", None):    # each joins the coordinator as a member of its own
        out += ["--proxy-id", f"{args.proxy_id}-{index}"]
    if args.admin:
        ahost, aport = hostport(args.admin, "--admin")
        out += ["--admin", f"{ahost}:{aport + index if aport else 0}"]
    return out


async def _joined(args: argparse.Namespace) -> int:
    """--join: a fleet member (docs/ha.md). Exits 3 if it must not go on serving (a newer coordinator
    exists elsewhere, or the authority moved while it was away)."""
    from ..proxyjoin import EXIT_STALE, Joiner

    if not args.admin:
        raise UsageError("--join needs --admin HOST:PORT: the coordinator drives the proxy through it")
    announce_host, announce_port = announce_address(args.announce) if args.announce else (None, 0)
    joiner = Joiner(hostport(args.join, "--join"), read_token(args.join_token_file, "--join"),
                    args.proxy_id or f"{socket.gethostname()}-{os.getpid()}", listen=hostport(args.listen, "--listen"),
                    admin=hostport(args.admin, "--admin"), client_tls=server_tls(args.tls_cert, args.tls_key),
                    fleet_tls=fleettls.from_flags(args.fleet_tls_cert, args.fleet_tls_key),
                    migrating=not args.not_migrating, name_prefix=args.name, max_clients=max_clients(args, 1),
                    announce_host=announce_host, announce_port=announce_port, reuse_port=args.reuse_port,
                    connection_budget=args.connection_budget)
    stop = asyncio.Event()     # before joining: a SIGTERM right after READY must still leave cleanly
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await joiner.start()
    assert joiner.proxy is not None
    print(f"durablecache proxy: listening on {joiner.listen[0]}:{joiner.proxy.port}, joined "
          f"{args.join}", flush=True)
    stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    failed: asyncio.Future[Any] = joiner.failed
    await asyncio.wait([stopping, failed], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    await joiner.stop()
    return EXIT_STALE if joiner.failed.done() else 0
