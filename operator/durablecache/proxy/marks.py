"""Marks from proxy processes to the syncer's process, over a small RESP protocol.

    proxy -> syncer   HELLO-MARKS <token> <proxy-name>    <- +OK   (or -ERR and the connection closes)
                      HELLO-FLEET <token> <proxy-id> <epoch>  <- $<JSON state>  (a proxy joining a fleet,
                                                            docs/ha.md; or -ERR and the connection closes)
                      READY <client-address> <admin-address>  <- +OK  (it applied the state; now a member)
                      MARK <db> <mark> [<mark> ...]       <- +OK   (after the syncer's callback returned)
                      BYE                                 <- +OK   (a clean goodbye)

A <mark> is a key (a bulk string: the whole key), or a member of a key (an array of two bulk
strings, [key, member]: members.py). A frame with key marks only is the plain RESP command it
always was.

A MARK is acknowledged after the syncer's callback took its keys, so an acknowledged frame means the
syncer has them. A connection that ends without BYE makes the server call ``on_lost(peer)``: marks
may have been lost, and the syncer must force a full verify-and-repair before any cutover.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import libvalkey

from .. import logs
from ..errors import ConnectError, DurableCacheError
from ..fleettls import HANDSHAKE_TIMEOUT, refused
from .members import MemberMark

log = logs.get("durablecache.marks")
# Takes the keys of completed writes. Either synchronous (returns None once it has them: the
# in-process syncer; the proxy delivers to it without a coroutine or a task) or a coroutine function
# (awaited: RemoteMarks). Synchronous callbacks that return anything else are treated as failures.
MarkCallback = Callable[[int, list[bytes]], Awaitable[None] | None]
Acked = Callable[[BaseException | None], None]   # RemoteMarks.submit: None once acknowledged, or why not
LostCallback = Callable[[str], Any]
# A proxy side's greeting in place of HELLO-MARKS (proxy/join.py): it gets the fresh connection's
# reader, writer and parser and returns once the server accepted it (ConnectError if not).
Greet = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Any], Awaitable[None]]
READ_CHUNK = 1 << 16
# Streamed marks wait this long for company: at a high write rate one frame then carries hundreds of
# keys, where per-iteration frames cost the proxy and the syncer a syscall and a wake-up each.
FLUSH_DELAY: Final = 0.005
RETRY_PAUSE: Final = 1.0     # after a failed reconnect, while streamed marks are still undelivered
# Fail closed across hosts (docs/ha.md): a proxy streams marks (answers before the ack) only while its
# oldest unacknowledged frame is younger than STALE_AFTER. The syncer's side drops a silent peer only
# after TCP keepalive / user timeout (PEER_DEAD_AFTER at the soonest), so by the time it counts a proxy
# as gone, that proxy has stopped answering writes whose marks did not arrive.
STALE_AFTER: Final = 2.0
KEEPALIVE_IDLE: Final = 5
KEEPALIVE_INTERVAL: Final = 2
KEEPALIVE_COUNT: Final = 3
PEER_DEAD_AFTER: Final = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT   # 11 s
SERVER_USER_TIMEOUT_MS: Final = 15000     # unacknowledged acks to a vanished peer: give up after this
PROXY_USER_TIMEOUT_MS: Final = 5000       # unacknowledged marks to a vanished syncer: reconnect sooner


class MarkServer:
    """Syncer side: accepts proxies, calls ``on_marks`` per batch in arrival order, acks each."""

    def __init__(self, on_marks: MarkCallback, token: str, *, host: str = "127.0.0.1", port: int = 0,
                 on_lost: LostCallback | None = None, fleet: Any = None, tls: ssl.SSLContext | None = None):
        self.on_marks = on_marks
        self.tls = tls      # fleettls.FleetTLS.server: TLS, and a peer must present the fleet's certificate
        self.on_lost = on_lost
        # Takes HELLO-FLEET and READY (fleet.Fleet: join(peer, args) -> state bytes, ready(peer, args,
        # host), left(peer)); None: only HELLO-MARKS is accepted.
        self.fleet = fleet
        self.host = host
        self.port = port
        self._token = token.encode()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reports: set[asyncio.Future[Any]] = set()   # on_lost calls that returned an awaitable
        self.peers: dict[str, int] = {}      # connected proxies -> batches received
        self.batches = 0
        self.keys = 0

    async def start(self) -> None:
        # TLS starts in _serve, not in the server: a peer that fails the handshake (plain TCP, another
        # certificate, none) is then refused with a line in this side's log, not silently.
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        server: Any = self._server     # as in Proxy.start: uvloop's sockets are a list, not a tuple
        self.port = int(server.sockets[0].getsockname()[1])
        log.info("marks.listening", address=f"{self.host}:{self.port}", tls=self.tls is not None)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                await asyncio.wait_for(t, 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        addr = writer.get_extra_info("peername")
        peer = f"{addr[0]}:{addr[1]}" if addr else "?"
        keep_alive(writer, SERVER_USER_TIMEOUT_MS)
        parser = libvalkey.Reader()
        authed = False
        clean = False
        member = False      # joined through HELLO-FLEET: the fleet hears when it ends
        try:
            if self.tls is not None and not await self._handshake(writer, peer):
                return
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                parser.feed(data)
                acks: list[bytes] = []
                while (cmd := parser.gets()) is not False:
                    verb = cmd[0].upper() if isinstance(cmd, list) and cmd else b""
                    if not authed:
                        if verb == b"HELLO-MARKS" and len(cmd) >= 2 and hmac.compare_digest(cmd[1], self._token):
                            authed = True
                            if len(cmd) > 2:
                                peer = f"{cmd[2].decode(errors='replace')}@{peer}"
                            self.peers[peer] = 0
                            acks.append(b"+OK\r\n")
                            log.info("marks.peer_connected", peer=peer)
                            continue
                        if (verb == b"HELLO-FLEET" and self.fleet is not None and len(cmd) >= 4 and not member
                                and hmac.compare_digest(cmd[1], self._token)):
                            peer = f"{cmd[2].decode(errors='replace')}@{peer}"
                            try:
                                state: bytes = await self.fleet.join(peer, cmd)
                            except DurableCacheError as exc:
                                writer.write(b"-ERR durablecache fleet: %s\r\n" % str(exc).encode())
                                await writer.drain()
                                return
                            member = True
                            acks.append(b"$%d\r\n%s\r\n" % (len(state), state))
                            continue
                        if verb == b"READY" and member and len(cmd) >= 3:
                            # Only now can marks flow: before READY is accepted the proxy refuses
                            # writes, so a connection that ends earlier lost nothing (no on_lost).
                            if not self.fleet.ready(peer, cmd, addr[0] if addr else "127.0.0.1"):
                                writer.write(b"".join(acks) + b"-ERR durablecache fleet: join expired\r\n")
                                await writer.drain()
                                return
                            authed = True
                            self.peers[peer] = 0
                            acks.append(b"+OK\r\n")
                            continue
                        writer.write(b"-ERR durablecache marks: bad token\r\n")
                        await writer.drain()
                        return
                    if verb == b"MARK" and len(cmd) >= 2:
                        taken = self.on_marks(int(cmd[1]), _marks_of(cmd))
                        if taken is not None:
                            await taken
                        self.batches += 1
                        self.keys += len(cmd) - 2
                        self.peers[peer] = self.peers.get(peer, 0) + 1
                        acks.append(b"+OK\r\n")
                    elif verb == b"BYE":
                        clean = True
                        writer.write(b"".join(acks) + b"+OK\r\n")
                        await writer.drain()
                        return
                    elif verb == b"PING":
                        acks.append(b"+PONG\r\n")

                    else:
                        acks.append(b"-ERR durablecache marks: unknown command\r\n")
                if acks:
                    writer.write(b"".join(acks))
                    await writer.drain()
        except (OSError, libvalkey.ProtocolError, ValueError):
            pass
        finally:
            # No await in here: compiled (mypyc), an await in a finally block leaves the pending
            # exception (a cancellation) set as the thread's handled exception, where later code finds it.
            self._tasks.discard(task)
            self.peers.pop(peer, None)
            writer.close()
            if member:
                self.fleet.left(peer)
            if authed and not clean:
                log.warning("marks.peer_lost", peer=peer)
                self._report_lost(peer)

    async def _handshake(self, writer: asyncio.StreamWriter, peer: str) -> bool:
        """TLS on an accepted connection; False, logged, for a peer that fails it (no token was read)."""
        assert self.tls is not None
        try:
            await writer.start_tls(self.tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except ssl.SSLError as exc:   # it spoke, but not TLS with the fleet's certificate
            log.warning("marks.tls_refused", peer=peer, reason=str(exc)[:200],
                        hint="the peer needs the fleet's certificate (--fleet-tls-cert) and TLS")
            return False
        except OSError:               # it left, or said nothing, before a handshake: a TCP probe (the
            return False              # coordinator pod's readiness check connects every 5 s)
        return True

    def _report_lost(self, peer: str) -> None:
        if self.on_lost is None:
            return
        result = self.on_lost(peer)
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)


class RemoteMarks:
    """Proxy side: ships batches of marks to a MarkServer, in order, over one connection.

    Two ways to submit (see ``submit``): *streamed* batches are sent within ``FLUSH_DELAY`` together
    with everything else submitted meanwhile, and nobody waits for their acknowledgement — the proxy
    has already answered those writes (docs/proxy.md, "Marks"); *acknowledged* batches are sent in
    the same loop iteration and their callbacks run on the syncer's ack. ``backlog_bytes`` (frames
    not acknowledged yet) is what the proxy's freeze waits to reach zero, and what bounds streaming.

    If the connection drops, it reconnects (for up to ``retry_for`` seconds per attempt) and re-sends
    every frame not yet acknowledged — the server saw the drop and already called ``on_lost``, so a
    batch that arrives twice does no harm. When an attempt fails, the waiting callbacks get the
    ConnectError (the proxy then closes those clients instead of acknowledging their writes); frames
    of streamed batches are kept and retried every ``RETRY_PAUSE`` until delivered or ``close()``.
    """

    def __init__(self, host: str, port: int, token: str, *, name: str = "durablecache-proxy",
                 retry_for: float = 10.0, greet: Greet | None = None, tls: ssl.SSLContext | None = None,
                 role: str = "syncer"):
        self.host = host
        self.role = role    # what the server is, in errors: "the syncer at HOST:PORT ..."
        self.tls = tls      # fleettls.FleetTLS.client: the server must present the fleet's certificate
        self.port = port
        self._token = token
        self.name = name
        self.retry_for = retry_for
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        # Frames sent (or to re-send) and not acknowledged yet, in order.
        self._unacked: deque[_Frame] = deque()
        self.backlog_bytes = 0                # size of the frames in _unacked
        self._batch: dict[int, list[bytes]] | None = None     # submitted, not framed yet
        self._batch_acked: list[Acked] = []
        self._batch_streamed = False
        self._timer: asyncio.TimerHandle | None = None
        self._soon = False
        self._lock = asyncio.Lock()
        self._closing = False
        self._reconnecting: asyncio.Task[None] | None = None
        self.greet = greet
        self.stale_after = STALE_AFTER
        # Told True once connected (greeted) and False when the connection ends: the proxy refuses
        # writes meanwhile (fail closed, docs/ha.md). Set by MarkDelivery.
        self.on_state: Callable[[bool], None] | None = None

    @property
    def connected(self) -> bool:
        """Is the stream to the syncer up (greeted)? Marks are streamed only then."""
        return self._writer is not None

    def _tell(self, up: bool) -> None:
        if self.on_state is not None:
            self.on_state(up)

    def streaming(self, now: float) -> bool:
        """May replies go out before their marks' ack? Only while connected and nothing waits for an
        ack longer than STALE_AFTER (a silent syncer: a partition, a vanished host)."""
        if self._writer is None:
            return False
        unacked = self._unacked
        return not unacked or now - unacked[0].sent_at < self.stale_after

    @property
    def pending(self) -> int:
        """Frames not acknowledged yet, plus a batch not framed yet: 0 once the syncer has everything."""
        return len(self._unacked) + (self._batch is not None)

    def touches(self, keys: set[bytes]) -> int:
        """How many unacknowledged frames or pending batches name one of ``keys`` (any db)."""
        n = sum(1 for f in self._unacked if any(k in keys for k in f.keys))
        if self._batch:
            n += sum(1 for ks in self._batch.values() if any(k in keys for k in ks))
        return n

    async def connect(self) -> None:
        async with self._lock:
            await self._connect_locked()

    async def _connect_locked(self) -> None:
        if self._writer is not None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        delay = 0.05
        who = f"the {self.role} at {self.host}:{self.port}"
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, ssl=self.tls), 5.0)
                break
            except ssl.SSLError as exc:     # not a server that is not up yet: one that is not ours
                raise refused(who, exc, True) from None
            except (TimeoutError, OSError) as exc:
                if self.tls is not None and isinstance(exc, ConnectionResetError):
                    # It took the connection, then dropped our handshake: up, but not serving TLS.
                    raise refused(who, "it closed the connection during the handshake", True) from None
                if loop.time() + delay > deadline:
                    raise ConnectError(f"cannot reach {who}: {str(exc) or type(exc).__name__}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        keep_alive(writer, PROXY_USER_TIMEOUT_MS)
        parser = libvalkey.Reader()
        try:
            await self._greet(reader, writer, parser, who)
        except TimeoutError:
            writer.close()
            raise ConnectError(f"{who} did not answer our greeting in time") from None
        except (OSError, libvalkey.ProtocolError, PeerClosed) as exc:
            # A mark server answers every greeting, if only with -ERR. Closing instead means, with TLS,
            # that it refused our certificate (TLS 1.3 tells the client after its handshake); without,
            # that it expects TLS (a ClientHello, not RESP) or answered in TLS (no RESP either).
            writer.close()
            raise refused(who, exc, self.tls is not None) from None
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        for f in self._unacked:       # re-send what the old connection did not ack
            writer.write(f.frame)
        self._reader_task = loop.create_task(self._read_acks(reader, parser))
        self._tell(True)

    async def _greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parser: Any,
                     who: str) -> None:
        if self.greet is not None:
            await self.greet(reader, writer, parser)
            return
        writer.write(libvalkey.pack_command((b"HELLO-MARKS", self._token.encode(), self.name.encode())))
        reply = await read_reply(reader, parser, who)
        if isinstance(reply, libvalkey.ReplyError):
            raise ConnectError(f"{who} refused us: {reply}")

    async def _read_acks(self, reader: asyncio.StreamReader, parser: Any) -> None:
        try:
            while True:
                while (reply := parser.gets()) is not False:
                    if not self._unacked:
                        continue
                    f = self._unacked.popleft()
                    self.backlog_bytes -= len(f.frame)
                    if f.acked is None:     # nobody waits for this one
                        continue
                    failed = ConnectError(f"syncer rejected marks: {reply}") \
                        if isinstance(reply, libvalkey.ReplyError) else None
                    _notify(f.acked, failed)
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                parser.feed(data)
        except OSError:
            pass
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        if not self._closing:
            self._tell(False)
            # Always, not only with frames to re-send: while the stream is down the proxy refuses
            # writes, so no new frame would ask for the reconnect.
            self._reconnect_later()

    def _reconnect_later(self) -> None:
        """Start reconnecting, unless that is under way (every batch submitted meanwhile asks)."""
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            try:
                async with self._lock:
                    await self._connect_locked()
                return
            except ConnectError as exc:
                self._give_up_waiting(exc)
            if self._closing:
                return
            log.warning("marks.syncer_unreachable", frames=len(self._unacked), retry_in=RETRY_PAUSE)
            await asyncio.sleep(RETRY_PAUSE)

    def _give_up_waiting(self, exc: ConnectError) -> None:
        """A reconnect attempt failed: fail the batches someone waits for, and drop their frames unless
        they also hold streamed marks (writes already answered: those must still arrive)."""
        kept: deque[_Frame] = deque()
        for f in self._unacked:
            if f.acked is not None:
                _notify(f.acked, exc)
                f.acked = None
            if f.streamed:
                kept.append(f)
            else:
                self.backlog_bytes -= len(f.frame)
        self._unacked = kept

    async def __call__(self, db: int, keys: list[bytes]) -> None:
        if self._writer is None:
            async with self._lock:
                await self._connect_locked()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit({db: list(keys)}, _settles(fut))
        await fut

    def submit(self, batch: dict[int, list[bytes]], acked: Acked | None = None) -> None:
        """Send marks (db -> keys; the lists are taken over, not copied) without a coroutine (the
        proxy's hot path). With ``acked``: sent in this loop iteration, and ``acked(None)`` once the
        syncer acknowledged them, ``acked(error)`` when ``__call__`` would raise. Without: streamed —
        sent within FLUSH_DELAY, retried until delivered; ``backlog_bytes`` and ``pending`` tell
        when the syncer has them. Everything submitted until the send shares one frame per db."""
        if self._batch is None:
            self._batch = {}
        for db, keys in batch.items():
            pending = self._batch.get(db)
            if pending is None:
                self._batch[db] = keys
            else:
                pending.extend(keys)
        if acked is None:
            self._batch_streamed = True
            if self._timer is None and not self._soon:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)
        else:
            self._batch_acked.append(acked)
            if not self._soon:
                self._soon = True
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Frame and send what was submitted (freeze calls this rather than wait for the timer)."""
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, acked, streamed = self._batch, self._batch_acked, self._batch_streamed
        if batch is None:
            return
        self._batch, self._batch_acked, self._batch_streamed = None, [], False
        if not batch:
            _notify(acked, None)
            return
        frames = []
        last = len(batch) - 1
        for i, (db, keys) in enumerate(batch.items()):
            frame = mark_frame(db, keys)
            frames.append(frame)
            self.backlog_bytes += len(frame)
            self._unacked.append(_Frame(frame, keys, acked if i == last and acked else None, streamed))
        if self._writer is not None:
            self._writer.write(b"".join(frames))
        elif not self._closing:
            self._reconnect_later()       # sent (re-sent) once connected

    async def close(self) -> None:
        """Send what is pending, say goodbye cleanly (the syncer then knows no marks were lost), close."""
        self._closing = True
        self.flush()
        writer = self._writer
        if writer is not None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._unacked.append(_Frame(b"", [], [_settles(fut)], False))
            writer.write(libvalkey.pack_command((b"BYE",)))
            with contextlib.suppress(TimeoutError, ConnectError):
                await asyncio.wait_for(fut, 5.0)
            writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        self._writer = None


def keep_alive(writer: asyncio.StreamWriter, user_timeout_ms: int) -> None:
    """TCP keepalive (and a bound on unacknowledged data) on a mark connection, so that a peer whose
    host vanished is noticed in seconds, not when TCP gives up on its own (minutes)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):   # not Linux: the system's defaults
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)


class PeerClosed(ConnectError):
    """The other end of a mark connection closed it before it answered."""


async def read_reply(reader: asyncio.StreamReader, parser: Any, who: str, timeout: float = 5.0) -> Any:
    """The next reply on a mark connection (ConnectError if it closes first)."""
    while (reply := parser.gets()) is False:
        data = await asyncio.wait_for(reader.read(READ_CHUNK), timeout)
        if not data:
            raise PeerClosed(f"{who} closed the connection")
        parser.feed(data)
    return reply


class _Frame:
    """A MARK frame sent (or to re-send) and not acknowledged yet."""

    __slots__ = ("frame", "keys", "acked", "streamed", "sent_at")

    def __init__(self, frame: bytes, keys: list[bytes], acked: list[Acked] | None, streamed: bool):
        self.sent_at = time.monotonic()      # framed (sent, or queued to be) at
        self.frame = frame
        self.keys = keys
        self.acked = acked        # callbacks waiting for this frame's ack (the batch it ends); None: nobody
        self.streamed = streamed  # holds marks of writes already answered: never dropped


# "\r\n" ending the previous argument, then the next one's bulk header: one part per key boundary.
_BULK_HEADERS: Final = [b"\r\n$%d\r\n" % n for n in range(256)]


def encode_marks(db: int, keys: list[bytes]) -> bytes:
    """``MARK <db> <mark>...`` in RESP: the reference for ``mark_frame`` (_resp.c), which sizes the
    frame first and fills it in place (5 ns per key, against 27 here). libvalkey's pack_command grows
    its buffer key by key (a realloc and a printf each), which costs more still. A MemberMark (a bytes
    subclass) goes as the array [key, member]."""
    dbs = b"%d" % db
    parts = [b"*%d\r\n$4\r\nMARK\r\n$%d\r\n%s" % (len(keys) + 2, len(dbs), dbs)]
    headers = _BULK_HEADERS
    for k in keys:
        if k.__class__ is not bytes:
            member: bytes = getattr(k, "member")   # noqa: B009 - only MemberMark has it; mypyc-safe
            parts.append(b"\r\n*2\r\n$%d\r\n" % len(k))
            parts.append(bytes(k))
            parts.append(b"\r\n$%d\r\n" % len(member))
            parts.append(member)
            continue
        n = len(k)
        parts.append(headers[n] if n < 256 else b"\r\n$%d\r\n" % n)
        parts.append(k)
    parts.append(b"\r\n")
    return b"".join(parts)


def _marks_of(cmd: list[Any]) -> list[bytes]:
    """A received MARK frame's marks: keys as they are, [key, member] arrays as MemberMarks."""
    marks: list[Any] = cmd[2:]     # not list[bytes]: compiled code would check each item's type
    if any(m.__class__ is list for m in marks):
        return [MemberMark.of(m[0], m[1]) if m.__class__ is list else m for m in marks]
    return marks


try:
    from ._resp import mark_frame
except ImportError:      # built without a C compiler (DURABLECACHE_PURE_PYTHON=1)
    mark_frame = encode_marks


def _settles(fut: asyncio.Future[None]) -> Acked:
    """An Acked callback that completes ``fut`` (the awaitable API on top of ``submit``)."""
    def acked(failed: BaseException | None) -> None:
        if fut.done():
            return
        if failed is None:
            fut.set_result(None)
        else:
            fut.set_exception(failed)
    return acked


def _notify(acked: list[Acked], failed: BaseException | None) -> None:
    """Tell everyone waiting on a batch; one failing callback must not stop the acks of the others."""
    for done in acked:
        try:
            done(failed)
        except Exception:  # noqa: BLE001
            log.exception("marks.ack_callback_failed")
