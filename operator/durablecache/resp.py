"""A small asyncio RESP client built for bulk pipelines.

The copier, verifier and syncer send thousands of commands per round trip; a general-purpose client
spends more time on its own bookkeeping than the server spends on the commands. This one packs
commands with libvalkey's ``pack_command``, frames replies with libvalkey's C reader, and returns
error replies as values so a pipeline reports per-command failures without aborting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import Iterable, Sequence
from typing import Any

import libvalkey

from .errors import ConnectError, ServerError
from .urls import Endpoint

ReplyError = libvalkey.ReplyError
Command = Sequence[Any]

CONNECT_TIMEOUT = 5.0
# A TLS handshake with a server that speaks TLS takes milliseconds; a plain-TCP server never answers a
# ClientHello (it waits for the end of an inline command), so this bounds how long that takes to say.
TLS_HANDSHAKE_TIMEOUT = 3.0
REPLY_TIMEOUT = 120.0
OK = b"+OK\r\n"


def pack(commands: Iterable[Command]) -> bytes:
    return b"".join(libvalkey.pack_command(tuple(c)) for c in commands)


def tls_context(endpoint: Endpoint) -> ssl.SSLContext | None:
    if not endpoint.tls:
        return None
    ctx = ssl.create_default_context(cafile=endpoint.ca_file)
    if endpoint.tls_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Wire(asyncio.Protocol):
    """A socket's incoming bytes, handed over as they arrive: no StreamReader in between, which
    copies every chunk twice (the bulk copy moves hundreds of MB through here)."""

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._eof = False

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self._eof = True
        self._error = exc
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """The next chunk; b"" once the peer closed the connection."""
        while not self.chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.chunks.popleft()


async def _start_tls(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, wire: _Wire,
                     context: ssl.SSLContext, endpoint: Endpoint) -> asyncio.Transport:
    """The TLS handshake on a connected socket; a one-line ConnectError when it fails."""
    try:
        tls = await asyncio.wait_for(
            loop.start_tls(transport, wire, context, server_hostname=endpoint.tls_hostname,
                           ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT),
            TLS_HANDSHAKE_TIMEOUT + 1)
    except ssl.SSLCertVerificationError as exc:
        transport.close()
        raise ConnectError(f"TLS handshake with {endpoint.address} failed: certificate verify failed "
                           f"({exc.verify_message}; a private CA goes in the URL: ?ca=/path/ca.pem)") from None
    except (TimeoutError, OSError, ssl.SSLError) as exc:
        transport.close()
        # The loop reports its handshake timeout as ConnectionAbortedError("SSL handshake is taking longer ...").
        slow = isinstance(exc, asyncio.TimeoutError) or "taking longer" in str(exc)
        raise _not_tls(endpoint, f"no answer in {TLS_HANDSHAKE_TIMEOUT:g} s" if slow else _os_reason(exc)) from None
    if tls is None:  # the peer closed the connection during the handshake
        transport.close()
        raise _not_tls(endpoint, "connection closed")
    return tls


def _not_tls(endpoint: Endpoint, reason: str) -> ConnectError:
    return ConnectError(f"TLS handshake with {endpoint.address} failed — is it a plain-TCP port? "
                        f"({reason}; valkey:// is plain TCP, valkeys:// is TLS)")


class Connection:
    """One connection to one server, used by one task at a time."""

    def __init__(self, endpoint: Endpoint, transport: asyncio.Transport, wire: _Wire):
        self.endpoint = endpoint
        self._transport = transport
        self._wire = wire
        self._parser = libvalkey.Reader()
        self.broken = False
        # IAM: the monotonic time by which this connection authenticates again (iamauth.py); None
        # for a password or no authentication, which never expire.
        self._reauth_at: float | None = None

    @classmethod
    async def open(
        cls, endpoint: Endpoint, name: str = "durablecache-engine", select_db: int | None = None
    ) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            transport, wire = await asyncio.wait_for(
                loop.create_connection(_Wire, endpoint.host, endpoint.port), CONNECT_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else _os_reason(exc)
            raise ConnectError(f"cannot reach {endpoint.address}: {reason}") from None
        context = tls_context(endpoint)
        if context is not None:
            # TCP first, then TLS on its own clock: a failed handshake is named as such instead of
            # looking like an unreachable server.
            transport = await _start_tls(loop, transport, wire, context, endpoint)
        conn = cls(endpoint, transport, wire)
        try:
            await conn._handshake(name, endpoint.db if select_db is None else select_db)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _handshake(self, name: str, db: int) -> None:
        if self.endpoint.iam is not None:
            await self._iam_auth()
        elif self.endpoint.password is not None:
            auth: list[Any] = ["AUTH"]
            if self.endpoint.username:
                auth.append(self.endpoint.username)
            auth.append(self.endpoint.password)
            reply = (await self.pipeline([auth]))[0]
            if isinstance(reply, ReplyError):
                raise ConnectError(f"authentication failed for {self.endpoint.redacted()}: {reply}")
        replies = await self.pipeline([["CLIENT", "SETNAME", name], ["PING"]])
        for reply in replies:
            if isinstance(reply, ReplyError):
                if str(reply).startswith("NOAUTH"):
                    raise ConnectError(f"{self.endpoint.address} requires a password "
                                       "(give it in the URL or a password file)")
                raise ConnectError(f"{self.endpoint.address} refused the connection: {reply}")
        if db:
            await self.call("SELECT", db)

    async def _iam_auth(self, fresh: bool = False) -> None:
        """AUTH with a recent token, or a new one for ``fresh`` (signing may refresh the pod's
        credentials, which can mean a call to STS: off the loop)."""
        iam = self.endpoint.iam
        assert iam is not None
        user, token = await asyncio.to_thread(iam.login, fresh)
        self._reauth_at = None          # the AUTH below goes through _exchange: no recursion
        reply = (await self.pipeline([["AUTH", user, token]]))[0]
        if isinstance(reply, ReplyError):
            # Not used again (a re-authentication that failed must not leave it running as before);
            # the token is never in a message: only the user id and the cache it was signed for.
            self.broken = True
            self._transport.close()
            raise ConnectError(f"IAM authentication as {user!r} for {iam.cache!r} failed at "
                               f"{self.endpoint.address}: {reply}")
        self._reauth_at = time.monotonic() + iam.reauth_after

    async def pipeline(self, commands: Sequence[Command], timeout: float = REPLY_TIMEOUT) -> list[Any]:
        """Send all commands in one write and return one reply per command (errors as values)."""
        if not commands:
            return []
        return await self._exchange(pack(commands), len(commands), timeout, False)  # type: ignore[return-value]

    async def pipeline_packed(self, data: bytes, want: int, timeout: float = REPLY_TIMEOUT) -> list[Any] | None:
        """Send ``want`` commands already encoded as RESP (``data``) whose every reply is +OK or an
        error (RESTORE, SET): a shorter reply such as ``:1`` would stall the +OK fast path.

        Returns None when every reply is +OK, without building a reply object per command (the bulk
        copy's RESTORE stream); otherwise every reply, as ``pipeline`` does.
        """
        if not want:
            return None
        return await self._exchange(data, want, timeout, True)

    async def pipeline_raw(self, data: bytes, want: int, timeout: float = REPLY_TIMEOUT) -> list[Any]:
        """``pipeline`` for ``want`` commands already encoded as RESP."""
        if not want:
            return []
        return await self._exchange(data, want, timeout, False)  # type: ignore[return-value]

    @property
    def usable(self) -> bool:
        """Neither out of step (``broken``) nor closed by the server or the network."""
        return not self.broken and not self._transport.is_closing()

    async def _exchange(self, data: bytes, want: int, timeout: float, expect_ok: bool) -> list[Any] | None:
        if self._reauth_at is not None and time.monotonic() >= self._reauth_at:
            # Before AWS's 12 hours are up: a fresh token, on this connection, between two exchanges
            # (never inside one, so no reply is out of step).
            await self._iam_auth(fresh=True)
        if self.broken:
            raise ConnectError(f"connection to {self.endpoint.address} is broken")
        if self._transport.is_closing():   # the server or the network closed it since the last use
            self.broken = True
            raise ConnectError(f"{self.endpoint.address} closed the connection")
        replies: list[Any] = []
        # Until every reply is read the connection is out of step: if we stop early (timeout, error,
        # cancellation), the next command would receive this one's reply. It is then never used again.
        self.broken = True
        try:
            self._transport.write(data)
            async with asyncio.timeout(timeout):
                if expect_ok and await self._all_ok(want):
                    self.broken = False
                    return None
                gets, append = self._parser.gets, replies.append
                for _ in range(want):
                    reply = gets()
                    while reply is False:
                        await self._feed()
                        reply = gets()
                    append(reply)
        except TimeoutError:
            self._transport.close()
            raise ConnectError(f"{self.endpoint.address} did not answer within {timeout:g}s") from None
        except OSError as exc:
            self._transport.close()
            raise ConnectError(f"connection to {self.endpoint.address} failed: {_os_reason(exc)}") from None
        except RuntimeError as exc:    # uvloop: a write on a transport closed under us
            self._transport.close()
            raise ConnectError(f"connection to {self.endpoint.address} failed: {exc}") from None
        except BaseException:
            self._transport.close()
            raise
        self.broken = False
        return replies

    async def _feed(self) -> None:
        data = await self._wire.read()
        if not data:
            raise ConnectError(f"{self.endpoint.address} closed the connection")
        self._parser.feed(data)

    async def _all_ok(self, want: int) -> bool:
        """Read until ``want`` replies of exactly +OK could have arrived. True if they did: the bytes
        are then consumed. Otherwise everything read went to the parser (any other reply is longer
        than +OK, so we never read past the replies we are owed) and the caller parses as usual."""
        need = len(OK) * want
        buf = bytearray()
        while len(buf) < need:
            data = await self._wire.read()
            if not data:
                raise ConnectError(f"{self.endpoint.address} closed the connection")
            buf += data
        if len(buf) == need and buf.count(OK) == want:
            return True
        self._parser.feed(bytes(buf))
        return False

    async def call(self, *args: Any, timeout: float = REPLY_TIMEOUT) -> Any:
        """One command; an error reply raises ServerError."""
        reply = (await self.pipeline([args], timeout))[0]
        if isinstance(reply, ReplyError):
            raise ServerError(f"{self.endpoint.address}: {_name(args)} failed: {reply}")
        return reply

    async def close(self) -> None:
        self._transport.close()
        with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
            await asyncio.wait_for(asyncio.shield(self._wire.lost), 2.0)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def reply_map(flat: Any) -> dict[Any, Any]:
    """A map reply as a dict: RESP3 sends a map, RESP2 a flat [key, value, ...] list."""
    if isinstance(flat, dict):
        return flat
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def reply_text_map(flat: Any) -> dict[str, Any]:
    """reply_map with the keys decoded to str."""
    return {text(k): v for k, v in reply_map(flat).items()}


def _name(args: Sequence[Any]) -> str:
    head = args[0]
    return (head.decode() if isinstance(head, bytes) else str(head)).upper()


def _os_reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
