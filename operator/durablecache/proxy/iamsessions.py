"""Client sessions that authenticated to the proxy with an ElastiCache IAM token (docs/aws.md, "Client
sessions across FLIP").

A client's token is signed for one cache (the source's replication group) and accepted for 15 minutes,
so the proxy cannot replay it on a connection to the target, nor on a new connection to the source
once it has expired. For a session whose ``AUTH <user> <token>`` a server accepted (the session proved
it is that IAM user: ``Routing.auth_proven``), the proxy authenticates such connections as the same user
with a token it signs itself, for that side's cache, with the worker's identity (which needs
elasticache:Connect on the side and on the user: deploy/iam-policy.json). It never acts as a user a
session has not proved to be, and never for a side whose endpoint is not an IAM one (``Endpoint.iam``,
which names the cache and region to sign for).

A connection authenticated with a token of ours authenticates again, with a newly signed one, every
``reauth_after`` (11 hours by default, AWS closes it at 12): ``Routing._renew_later``.

Tokens are recognised by their shape: ``<cache>/?Action=connect&User=<user>&...&X-Amz-Signature=...``
with ``User`` equal to the AUTH user. Nothing here logs or keeps a client's token.
"""

from __future__ import annotations

import datetime
from urllib.parse import parse_qs

from ..iamauth import IamAuth
from ..urls import Endpoint

AuthArgs = tuple[bytes, ...]
# A client's own token is replayed while it has at least this long to live; after that the proxy signs.
FRESH_MARGIN = 60.0


def token_fields(password: bytes) -> tuple[str, dict[str, str]] | None:
    """(cache, query fields) of an IAM token, or None for anything else (a password)."""
    try:
        text = password.decode("ascii")
    except UnicodeDecodeError:
        return None
    cache, sep, query = text.partition("/?")
    if not sep or not cache:
        return None
    fields = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
    if fields.get("Action") != "connect" or "X-Amz-Signature" not in fields or "X-Amz-Date" not in fields:
        return None
    return cache, fields


def iam_user(auth: AuthArgs | None) -> bytes | None:
    """The user ``AUTH <user> <token>`` authenticates as through an IAM token, else None."""
    if auth is None or len(auth) != 3:
        return None
    found = token_fields(auth[2])
    if found is None or found[1].get("User") != auth[1].decode(errors="replace"):
        return None
    return auth[1]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _fresh(fields: dict[str, str], now: datetime.datetime) -> bool:
    try:
        signed = datetime.datetime.strptime(fields["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
        expires = int(fields.get("X-Amz-Expires", "0"))
    except ValueError:
        return False
    return (signed + datetime.timedelta(seconds=expires) - now).total_seconds() > FRESH_MARGIN


class SessionLogins:
    """The tokens the proxy signs for its sessions' IAM users: one minter per (side, user), so a token
    is reused for the many connections of one user for a while (iamauth.TOKEN_REUSE)."""

    def __init__(self) -> None:
        self._minters: dict[tuple[IamAuth, bytes], IamAuth] = {}

    def auth_for(self, auth: AuthArgs, endpoint: Endpoint, proven: bytes | None, renew: bool = False) -> AuthArgs:
        """What to replay on a new connection to ``endpoint`` for a session whose AUTH is ``auth``
        and which proved to be IAM user ``proven``: its own AUTH while that is a fresh token for this
        side's cache, else ``AUTH <user> <token signed for this side>``; any other AUTH as it is.
        ``renew``: for a connection that authenticated with our token and must do so again (a token
        signed now)."""
        side = endpoint.iam
        if side is None or proven is None or iam_user(auth) != proven:
            return auth
        found = token_fields(auth[2])
        if not renew and found is not None and found[0] == side.cache and \
                _fresh(found[1], (side.clock or _utc_now)()):
            return auth
        minter = self._minters.get((side, proven))
        if minter is None:
            minter = IamAuth(user=proven.decode(), cache=side.cache, region=side.region, serverless=side.serverless,
                             reauth_after=side.reauth_after, credentials=side.credentials, clock=side.clock)
            self._minters[(side, proven)] = minter
        _user, token = minter.login(fresh=renew)
        return (b"AUTH", proven, token.encode())


LOGINS = SessionLogins()
