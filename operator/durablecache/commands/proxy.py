"""``durablecache proxy``: run the dual-write proxy in front of one upstream (standalone or cluster)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
from typing import Any

from .. import logs
from ..errors import UsageError
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
    p.add_argument("--tls-cert", help="serve clients over TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    p.add_argument("--not-migrating", action="store_true",
                   help="forward FLUSHALL/FLUSHDB/SWAPDB/MOVE instead of refusing them")
    p.add_argument("--name", default="durablecache-proxy", help="prefix of the proxy's upstream client names")
    p.add_argument("--json", action="store_true", help="log JSON lines")


def run(args: argparse.Namespace) -> int:
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
    client_tls = _client_tls(args)
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
                  migrating=not args.not_migrating, name_prefix=args.name)
    await proxy.start()
    admin = None
    if admin_addr is not None:
        admin = AdminServer(proxy, admin_token, admin_addr[0], admin_addr[1])
        await admin.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"durablecache proxy: listening on {host}:{proxy.port} -> {upstream.redacted()}", flush=True)
    await stop.wait()
    log.info("proxy.stopping", **{k: v for k, v in proxy.stats().items() if k in ("clients", "commands", "writes")})
    if admin is not None:
        await admin.stop()
    await proxy.stop()
    if remote is not None:
        await remote.close()
    return 0


def _client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls_cert or args.tls_key):
        return None
    if not (args.tls_cert and args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    client_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    client_tls.load_cert_chain(args.tls_cert, args.tls_key)
    return client_tls


async def _joined(args: argparse.Namespace) -> int:
    """--join: a fleet member (docs/ha.md). Exits 3 if it must not go on serving (a newer coordinator
    exists elsewhere, or the authority moved while it was away)."""
    from ..proxyjoin import EXIT_STALE, Joiner

    if not args.admin:
        raise UsageError("--join needs --admin HOST:PORT: the coordinator drives the proxy through it")
    joiner = Joiner(hostport(args.join, "--join"), read_token(args.join_token_file, "--join"),
                    args.proxy_id or f"{socket.gethostname()}-{os.getpid()}", listen=hostport(args.listen, "--listen"),
                    admin=hostport(args.admin, "--admin"), client_tls=_client_tls(args),
                    migrating=not args.not_migrating, name_prefix=args.name)
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
