"""A session's connection to the side the next FLIP switches to, opened and set up at PREPARE, while
writes still flow (``Prepared``): connected, TLS done, authenticated as the session's user, its
protocol, database and our connection name applied, its CLIENT ID known. A session's state that
changes before the FLIP (AUTH, HELLO, SELECT) is sent to it as well (``sync``).

At the switch (session.Session.catch_up) the transport is handed to an ``upstream.Upstream`` as it
is, provided the connection is ``ready_for`` exactly the session's state: every command it was sent
answered, none refused. Otherwise it is closed and the session opens a connection as it would at any
time (routing.Routing.conn: the state replayed), which is slower but equally correct.

Its replies are parsed here (libvalkey's reader), never seen by the session: in standalone mode the
session's replies are matched to its one queue in request order, which a second connection's
handshake would disorder.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import libvalkey

from .. import logs

log = logs.get("durablecache.proxy")

# (auth args or None, protocol, db): what a connection has of a client's state
State = tuple[tuple[bytes, ...] | None, int, int]


class Prepared(asyncio.Protocol):
    """One prepared connection to one node of the next side."""

    def __init__(self, node: int, name: bytes,
                 login: Callable[[tuple[bytes, ...]], tuple[bytes, ...]] | None = None):
        self.node = node
        self.name = name
        # The session's AUTH as this side is sent it (routing.Routing.login_for: an IAM session's
        # token signed for this side); the state compared (``has``/``sent``) stays the client's own.
        self.login = login
        self.signed = False       # authenticated with a token the proxy signed (renewed: routing.py)
        self.transport: asyncio.Transport | None = None
        self.reader = libvalkey.Reader()
        self.obuf: list[bytes] = []
        self.checks: deque[Callable[[Any], None]] = deque()    # one per command sent, in order
        self.failed = False
        self.closed = False
        self.has: State = (None, 2, 0)       # answered: in effect on the connection
        self.sent: State = (None, 2, 0)      # what it will be once every command sent is answered
        self.named = False
        self.client_id: int | None = None

    # -- the session's state --------------------------------------------------------------------
    def sync(self, want: State) -> None:
        """Send what makes the connection's state ``want``. Dropping an AUTH cannot be done on a
        connection (nothing un-authenticates it but RESET): such a connection is marked failed, and
        the switch opens a new one."""
        auth, proto, db = want
        sent_auth, sent_proto, sent_db = self.sent
        if self.failed or self.closed:
            return
        if auth is None and sent_auth is not None:
            self.failed = True
            return
        first = not self.checks and not self.named and self.client_id is None
        if auth is not None and auth != sent_auth:
            login = self.login(auth) if self.login is not None else auth
            self.signed = login is not auth
            user, password = (b"default", login[1]) if len(login) == 2 else (login[1], login[2])
            self._send((b"HELLO", str(proto).encode(), b"AUTH", user, password, b"SETNAME", self.name),
                       self._took(want_auth=auth, want_proto=proto))
            first = False
            self.named = True
        elif proto != sent_proto:
            self._send((b"HELLO", str(proto).encode()), self._took(want_proto=proto))
        if db != sent_db:
            self._send((b"SELECT", str(db).encode()), self._took(want_db=db))
        if first:       # no AUTH of the client's: the connection is ``default`` (no password needed)
            self._send((b"CLIENT", b"SETNAME", self.name), self._took())
            self.named = True
        if self.client_id is None:
            self._send((b"CLIENT", b"ID"), self._got_id)
        self.sent = want

    def ready_for(self, want: State) -> bool:
        """Usable as the session's connection now: connected, nothing unanswered, nothing refused,
        and exactly the session's state."""
        return (self.transport is not None and not self.failed and not self.closed and not self.checks
                and self.client_id is not None and self.has == want)

    def _took(self, want_auth: tuple[bytes, ...] | None = None, want_proto: int = 0,
              want_db: int = -1) -> Callable[[Any], None]:
        def check(reply: Any) -> None:
            if isinstance(reply, libvalkey.ReplyError):
                # e.g. the user does not exist on this side: the switch opens a connection the
                # ordinary way, whose gated AUTH gives the client the server's own error.
                log.info("proxy.prepare_refused", node=self.node, reason=str(reply))
                self.failed = True
                return
            auth, proto, db = self.has
            self.has = (want_auth if want_auth is not None else auth, want_proto or proto,
                        want_db if want_db >= 0 else db)
        return check

    def _got_id(self, reply: Any) -> None:
        if isinstance(reply, int):
            self.client_id = reply
        else:
            self.failed = True

    def _send(self, args: tuple[bytes, ...], check: Callable[[Any], None]) -> None:
        self.checks.append(check)
        data = libvalkey.pack_command(args)
        if self.transport is not None:
            self.transport.write(data)
        else:
            self.obuf.append(data)

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.closed:
            transport.close()
            return
        self.transport = transport  # type: ignore[assignment]
        if self.obuf:
            transport.write(b"".join(self.obuf))  # type: ignore[attr-defined]
            self.obuf.clear()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not self.checks:       # nothing asked: not a connection to hand over
                self.failed = True
                return
            self.checks.popleft()(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.failed = True

    def hand_over(self) -> asyncio.Transport:
        """The transport, for the session's Upstream (which becomes its protocol)."""
        t = self.transport
        assert t is not None
        self.transport = None
        self.closed = True
        return t

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
            self.transport = None
