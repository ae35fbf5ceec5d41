"""ElastiCache IAM authentication for DurableCache's own connections.

An ElastiCache user whose authentication mode is IAM has no password: a client sends
``AUTH <user-id> <token>`` where the token is a SigV4-presigned ``GET`` of
``http://<cache>/?Action=connect&User=<user-id>`` (plus ``&ResourceType=ServerlessCache`` for a
Serverless cache), service ``elasticache``, without the ``http://``. AWS accepts a token for 15 minutes
after it was signed and closes a connection that has not authenticated again within 12 hours
(AWS ElastiCache developer guide, "Authenticating with IAM"). So every connection authenticates with
a freshly minted token when it opens and again, with a new token, before ``reauth_after`` has passed
(resp.Connection does this before its next exchange).

The signing is botocore's (``SigV4QueryAuth``), with the instant it signs at injectable: tests mint with
fixed credentials and a frozen clock, set that exact token as an ACL user's password on a real server,
and connect. botocore is imported when a token is minted, not when this module is imported: the engine
imports this module through urls.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from .errors import ConnectError, UsageError

TOKEN_TTL = 900               # seconds AWS accepts a token after signing it
CONNECTION_LIFETIME = 12 * 3600.0   # AWS disconnects a connection not re-authenticated within this
# Re-authenticate an hour before AWS would disconnect: a connection busy with a long pipeline reaches
# its next exchange late, and the margin keeps that inside the 12 hours.
REAUTH_AFTER = CONNECTION_LIFETIME - 3600.0
# A token is reused for new connections for a while (signing costs little, but a copy opening many
# connections at once need not sign each); well inside TOKEN_TTL, so a reused token is never stale.
TOKEN_REUSE = 300.0

Clock = Callable[[], datetime.datetime]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


@dataclasses.dataclass(frozen=True)
class IamAuth:
    """How one side's connections authenticate through IAM: the ElastiCache user id (which AWS requires
    to equal the user name), the cache the token is for (the replication group id, or the Serverless
    cache's name) and the region it is signed for.

    ``credentials`` (a botocore Credentials object) and ``clock`` are for tests; by default the standard
    chain (IRSA, EKS Pod Identity, environment, profile) and the real time.
    """

    user: str
    cache: str
    region: str | None = None
    serverless: bool = False
    reauth_after: float = REAUTH_AFTER
    credentials: Any = dataclasses.field(default=None, compare=False, repr=False)
    clock: Clock | None = dataclasses.field(default=None, compare=False, repr=False)
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False, init=False)

    def __post_init__(self) -> None:
        if not self.user or not self.cache:
            raise UsageError("IAM authentication needs a user id and a cache (replication group id or "
                             "Serverless cache name)")
        if self.reauth_after <= 0 or self.reauth_after >= CONNECTION_LIFETIME:
            raise UsageError(f"IAM re-authentication interval must be above 0 and below "
                             f"{CONNECTION_LIFETIME:.0f} s, not {self.reauth_after}")
        self._cache["lock"] = threading.Lock()

    def query(self) -> list[str]:
        """The URL query parameters that describe this (urls.Endpoint.to_url)."""
        out = ["iam=1", f"cache={self.cache}"]
        if self.region:
            out.append(f"region={self.region}")
        if self.serverless:
            out.append("serverless=1")
        if self.reauth_after != REAUTH_AFTER:
            out.append(f"reauth={self.reauth_after:g}")
        return out

    def login(self, fresh: bool = False) -> tuple[str, str]:
        """(user, token) for AUTH: a token minted less than TOKEN_REUSE ago, else (or when ``fresh``:
        a re-authentication) a new one."""
        with self._cache["lock"]:
            minted = self._cache.get("minted")
            if not fresh and minted is not None and time.monotonic() - minted[0] < TOKEN_REUSE:
                return self.user, str(minted[1])
            token = self.mint()
            self._cache["minted"] = (time.monotonic(), token)
            return self.user, token

    def mint(self) -> str:
        """A new token, signed now (or at the injected clock's instant)."""
        return mint_token(self.user, self.cache, self._credentials(), self._region(),
                          serverless=self.serverless, now=(self.clock or _utc_now)())

    def _credentials(self) -> Any:
        if self.credentials is not None:
            return self.credentials.get_frozen_credentials() if hasattr(self.credentials, "get_frozen_credentials") \
                else self.credentials
        import botocore.session

        found = botocore.session.get_session().get_credentials()
        if found is None:
            raise ConnectError("IAM authentication: no AWS credentials found (IRSA, EKS Pod Identity, "
                               "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
        # Refreshable credentials (IRSA) renew themselves here when they are about to expire.
        return found.get_frozen_credentials()

    def _region(self) -> str:
        if self.region:
            return self.region
        import botocore.session

        region = botocore.session.get_session().get_config_variable("region")
        if not region:
            raise UsageError("IAM authentication needs a region: give region= in the URL or set AWS_REGION")
        return str(region)


def mint_token(user: str, cache: str, credentials: Any, region: str, *, serverless: bool = False,
               now: datetime.datetime | None = None, expires: int = TOKEN_TTL) -> str:
    """An ElastiCache IAM authentication token: the presigned connect request without its scheme."""
    from botocore.awsrequest import AWSRequest

    params = {"Action": "connect", "User": user}
    if serverless:
        params["ResourceType"] = "ServerlessCache"
    request = AWSRequest(method="GET", url=f"http://{cache}/?{urlencode(params)}")
    signer = _AtInstant(credentials, "elasticache", region, expires=expires)
    signer.instant = now or _utc_now()
    signer.add_auth(request)
    url = request.prepare().url
    return url.removeprefix("http://")


class _AtInstant:
    """botocore's SigV4QueryAuth signing at a given instant instead of reading the clock itself
    (which is what lets a test know the exact token in advance)."""

    def __init__(self, credentials: Any, service: str, region: str, expires: int):
        from botocore.auth import SIGV4_TIMESTAMP, SigV4QueryAuth

        self._auth = SigV4QueryAuth(credentials, service, region, expires=expires)
        self._format = SIGV4_TIMESTAMP
        self.instant = _utc_now()

    def add_auth(self, request: Any) -> None:
        # The steps of SigV4Auth.add_auth, with request.context["timestamp"] from our instant.
        auth = self._auth
        request.context["timestamp"] = self.instant.strftime(self._format)
        auth._modify_request_before_signing(request)
        canonical = auth.canonical_request(request)
        string_to_sign = auth.string_to_sign(request, canonical)
        auth._inject_signature_to_request(request, auth.signature(string_to_sign, request))
