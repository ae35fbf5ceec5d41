"""Endpoint URLs: ``valkey://[user:pass@]host:port[/db]`` and ``valkeys://`` for TLS.

``redis://`` and ``rediss://`` are accepted as synonyms. TLS options ride in the query string:
``?ca=/path/ca.pem`` (CA bundle), ``&servername=NAME`` (the name sent as SNI and verified in the server's
certificate when it differs from the host, e.g. an IP address or a tunnel), ``&insecure=1`` (skip
verification, for tests only).

ElastiCache IAM authentication: ``valkeys://USER-ID@host:port?iam=1&cache=REPLICATION-GROUP-ID``
(``&region=R``, ``&serverless=1`` for a Serverless cache). The user is then the user id, not a
password, and every connection authenticates with a token minted for it (iamauth.py).
"""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .errors import UsageError
from .iamauth import IamAuth

PLAIN_SCHEMES = {"valkey", "redis"}
TLS_SCHEMES = {"valkeys", "rediss"}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    db: int = 0
    tls: bool = False
    ca_file: str | None = None
    tls_insecure: bool = False
    db_given: bool = False
    # Credentials minted per connection (ElastiCache IAM) instead of username/password; carried to
    # every node of the cluster by with_address.
    iam: IamAuth | None = None
    server_name: str | None = None   # TLS: SNI and the certificate name to verify; None: the host

    @property
    def tls_hostname(self) -> str:
        """The name TLS sends (SNI) and verifies the server's certificate against."""
        return self.server_name or self.host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def with_address(self, host: str, port: int) -> Endpoint:
        """The same credentials and TLS settings for another node of the same cluster."""
        return dataclasses.replace(self, host=host, port=port)

    def redacted(self) -> str:
        """The URL without its password, safe for logs and messages."""
        scheme = "valkeys" if self.tls else "valkey"
        user = f"{self.username}:***@" if self.username else ("***@" if self.password else "")
        db = f"/{self.db}" if self.db_given else ""
        if self.iam is not None:   # no secret to hide: the token is minted per connection
            return f"{scheme}://{self.iam.user}@{self.host}:{self.port}{db}?iam=1"
        return f"{scheme}://{user}{self.host}:{self.port}{db}"

    def __str__(self) -> str:
        return self.redacted()

    def to_url(self) -> str:
        """The full URL, credentials included: only for handing to our own processes, never for logs."""
        scheme = "valkeys" if self.tls else "valkey"
        user = quote(self.username or "", safe="")
        auth = f"{user}:{quote(self.password, safe='')}@" if self.password is not None else ""
        query = []
        if self.iam is not None:
            auth = f"{quote(self.iam.user, safe='')}@"
            query.extend(self.iam.query())
        if self.ca_file:
            query.append(f"ca={quote(self.ca_file)}")
        if self.server_name:
            query.append(f"servername={quote(self.server_name)}")
        if self.tls_insecure:
            query.append("insecure=1")
        tail = ("?" + "&".join(query)) if query else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/{self.db}{tail}"


def parse_url(url: str) -> Endpoint:
    """Parse an endpoint URL; raise UsageError with a one-line reason when it is malformed."""
    if not url or "://" not in url:
        raise UsageError(f"malformed URL {_safe(url)!r}: expected valkey://[user:pass@]host:port[/db] "
                         "(or valkeys://, redis://, rediss://)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"malformed URL {_safe(url)}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in PLAIN_SCHEMES | TLS_SCHEMES:
        raise UsageError(f"malformed URL {_safe(url)}: scheme must be valkey:// or redis:// (plain TCP), "
                         "valkeys:// or rediss:// (TLS)")
    if not parts.hostname:
        raise UsageError(f"malformed URL {_safe(url)}: no host")
    db_text = parts.path.lstrip("/")
    if db_text and not db_text.isdigit():
        raise UsageError(f"malformed URL {_safe(url)}: database must be a number, not {db_text!r}")
    query = parse_qs(parts.query)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    iam = _iam(url, query, username, password)
    if iam is not None:
        username = None
    elif username is not None and password is None:
        # valkey://token@host means "AUTH token", the same as redis-cli -u.
        username, password = None, username
    return Endpoint(
        host=parts.hostname,
        port=port or 6379,
        username=username or None,
        password=password,
        db=int(db_text) if db_text else 0,
        db_given=bool(db_text),
        tls=scheme in TLS_SCHEMES,
        ca_file=query.get("ca", [None])[0],
        tls_insecure=query.get("insecure", ["0"])[0] in ("1", "true", "yes"),
        iam=iam,
        server_name=query.get("servername", [None])[0],
    )


def _iam(url: str, query: dict[str, list[str]], username: str | None, password: str | None) -> IamAuth | None:
    """``?iam=1&cache=ID[&region=R][&serverless=1][&reauth=SECONDS]`` with the user id as the URL's user."""
    if query.get("iam", ["0"])[0] not in ("1", "true", "yes"):
        return None
    if username is None or password is not None:
        raise UsageError(f"malformed URL {_safe(url)}: iam=1 takes the ElastiCache user id as the URL's user "
                         "and no password (valkeys://USER-ID@host:port?iam=1&cache=ID)")
    cache = query.get("cache", [""])[0]
    if not cache:
        raise UsageError(f"malformed URL {_safe(url)}: iam=1 needs cache=<replication group id or "
                         "Serverless cache name> (the token is signed for it)")
    iam = IamAuth(user=username, cache=cache, region=query.get("region", [None])[0],
                  serverless=query.get("serverless", ["0"])[0] in ("1", "true", "yes"))
    reauth = query.get("reauth", [None])[0]
    if not reauth:
        return iam
    try:
        return dataclasses.replace(iam, reauth_after=float(reauth))
    except ValueError:
        raise UsageError(f"malformed URL {_safe(url)}: reauth must be a number of seconds") from None


def _safe(url: str) -> str:
    """The URL with anything between :// and @ hidden, for error messages."""
    head, sep, tail = url.partition("://")
    if "@" in tail:
        tail = "***@" + tail.split("@", 1)[1]
    return f"{head}{sep}{tail}"
