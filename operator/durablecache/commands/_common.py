"""Pieces shared by the engine's subcommands."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import stat
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from .. import logs
from ..copier import refuse_same_server
from ..errors import UsageError
from ..topology import Topology, discover
from ..urls import Endpoint, parse_url

T = TypeVar("T")

# A password in --source/--target is visible to every user of the machine (`ps`, /proc/PID/cmdline):
# these take it from a file or the environment instead.
PASSWORD_ENV = {"source": "DURABLECACHE_SOURCE_PASSWORD", "target": "DURABLECACHE_TARGET_PASSWORD"}


def add_pair_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, metavar="URL",
                   help="valkey[s]://[user[:pass]@]host:port (any node of a cluster; every database is used). A "
                        "password in the URL shows in `ps`: prefer --source-password-file")
    p.add_argument("--target", required=True, metavar="URL", help="same form as --source")
    add_password_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON lines (progress, then one summary object)")


def add_password_arguments(p: argparse.ArgumentParser) -> None:
    for side in ("source", "target"):
        p.add_argument(f"--{side}-password-file", metavar="PATH",
                       help=f"read the {side}'s password (AUTH token) from this file (its first line) instead of "
                            f"the URL, where `ps` would show it; or set {PASSWORD_ENV[side]}. An ACL user "
                            f"stays in the URL: valkey://USER@host:port")


def side_endpoint(args: argparse.Namespace, side: str) -> Endpoint:
    """--source/--target parsed, with the password from --<side>-password-file or the environment.

    A password given in the URL and in a file is refused (which one is meant?); the environment
    variable is used only when neither gives one. With the password from a file or the environment,
    the URL's valkey://USER@host gives the ACL user name."""
    url = getattr(args, side)
    ep = parse_url(url)
    path = getattr(args, f"{side}_password_file", None)
    from_env = os.environ.get(PASSWORD_ENV[side])
    if ep.iam is not None:   # (aws helper's hunk) IAM mints its own tokens: a password would be ignored
        if path:
            raise UsageError(f"--{side} authenticates through IAM (iam=1); --{side}-password-file would not be "
                             "used: give one or the other")
        return ep
    if not path and not from_env:
        return ep
    parts = urlsplit(url)
    if parts.password is not None:
        if path:
            raise UsageError(f"--{side} has a password and --{side}-password-file gives one too: give it once")
        return ep  # the URL's own password wins over the environment
    # With the password elsewhere, valkey://alice@host names the ACL user (alone, it is an AUTH token).
    username = unquote(parts.username) if parts.username else None
    password = read_secret_file(path, f"--{side}-password-file") if path else from_env
    return dataclasses.replace(ep, username=username, password=password)


def whole_server(ep: Endpoint, side: str, command: str) -> Endpoint:
    """copy and verify work on every database of a server, each into the same number: a /N in the URL
    would be silently ignored, so it is refused."""
    if ep.db:
        raise UsageError(f"--{side} {ep.redacted()}: {command} works on whole servers (every database, each "
                         f"into the same number), not on database {ep.db}; drop /{ep.db} from the URL")
    return ep


async def discover_pair(args: argparse.Namespace, command: str) -> tuple[Topology, Topology]:
    src_ep = whole_server(side_endpoint(args, "source"), "source", command)
    dst_ep = whole_server(side_endpoint(args, "target"), "target", command)
    source, target = await discover(src_ep), await discover(dst_ep)
    refuse_same_server(source, target, command)
    return source, target


def hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"{what} must be HOST:PORT, not {value!r}")
    return host or "127.0.0.1", int(port)


def read_token(path: str | None, what: str) -> str:
    """A bearer token from its file (one line); a one-line error when it is missing or empty."""
    if not path:
        raise UsageError(f"{what} needs its token file")
    return read_secret_file(path, f"{what} token file", strip=True)


def read_secret_file(path: str, what: str, strip: bool = False) -> str:
    """The first line of a file holding a secret (a token, a password), without its line end (and
    without surrounding blanks if ``strip``).

    A file other users may read is accepted with a warning, not refused: Kubernetes mounts Secret
    volumes 0644 by default, and refusing would break that common case for a risk the warning names."""
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            first = f.readline()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text") from None
    secret = first.rstrip("\r\n")
    if not secret.strip():
        raise UsageError(f"{what} {path} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logs.get().warning(f"{what} {path} can be read by other users (mode {stat.S_IMODE(mode):04o}); "
                           f"chmod 600 it")
    return secret.strip() if strip else secret


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
    try:
        import uvloop  # optional: faster event loop where installed
    except ImportError:
        return asyncio.run(coro)
    # Not inside the try: an ImportError raised by the program itself must not start it a second time.
    return uvloop.run(coro)  # type: ignore[no-any-return]
