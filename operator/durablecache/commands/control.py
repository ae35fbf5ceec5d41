"""durablecache control: talk to a running `durablecache migrate --control` (status, approve, rollback,
accept-repair)."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request

from ..errors import ConnectError
from ._common import read_token

NAME = "control"
HELP = ("status of a running migration, approve its manual cutover, roll it back, or accept a repair that "
        "stopped to ask (via its --control API)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["status", "approve", "rollback", "accept-repair"],
                   help="accept-repair: let a blocked verify-and-repair delete/overwrite what it found (see status)")
    p.add_argument("--control", required=True, metavar="HOST:PORT", help="the migration's --control address")
    p.add_argument("--control-token-file", required=True, metavar="PATH", help="the migration's token file")


def run(args: argparse.Namespace) -> int:
    token = read_token(args.control_token_file, "--control")
    method, path = ("GET", "/status") if args.action == "status" else ("POST", f"/{args.action}")
    req = urllib.request.Request(f"http://{args.control}{path}", method=method,
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("error", exc.reason)
        print(f"durablecache control {args.action}: refused: {detail}")
        return 1
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectError(f"cannot reach the control API at {args.control}: {getattr(exc, 'reason', exc)}") from None
    print(json.dumps(body, indent=2))
    return 0
