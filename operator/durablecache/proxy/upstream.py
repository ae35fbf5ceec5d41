"""One connection from a session to one upstream node (``Upstream``): sending, the AUTH gate, and
reading its replies into the session's reply order: counted (a run of scalar replies), framed in
request order (standalone) or per node (cluster), pub/sub traffic told apart from replies.

``SessionBase`` is what a connection uses of its session; session.Session implements it (through
outbox.Outbox and routing.Routing). It is a native base class rather than a typing.Protocol so that,
compiled, the calls made for every chunk of replies stay native.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

import libvalkey

from .. import logs
from .framing import MINUS, PUSH, count_scalars, frame_end
from .replies import READ, Entry, Replies, first_word, last_int
from .router import Router
from .state import ProxyState

log = logs.get("durablecache.proxy")
pack_command: Final = libvalkey.pack_command

STAR: Final = 0x2A
MESSAGE_KINDS: Final = frozenset({b"message", b"pmessage", b"smessage"})
CONFIRM_KINDS: Final = frozenset({b"subscribe", b"psubscribe", b"ssubscribe",
                           b"unsubscribe", b"punsubscribe", b"sunsubscribe"})


class SessionBase(asyncio.Protocol):
    """The part of a client session its upstream connections see (set up by outbox.Outbox)."""

    id: int
    proxy: ProxyState[Any]
    router: Router
    pending: Replies          # standalone: every entry in request order
    out: list[bytes]          # replies ready for the client
    resp3: bool

    def queue_out(self, conn: Upstream) -> None:
        raise NotImplementedError

    def collect(self) -> None:
        raise NotImplementedError

    def kick(self) -> None:
        raise NotImplementedError

    def add_marks(self, e: Entry) -> None:
        raise NotImplementedError

    def oob(self, frame: bytes) -> None:
        raise NotImplementedError

    def abort(self, why: str) -> None:
        raise NotImplementedError

    def pause_client_reading(self) -> None:
        raise NotImplementedError

    def resume_client_reading(self) -> None:
        raise NotImplementedError

    def upstream_lost(self, conn: Upstream) -> None:
        raise NotImplementedError

    def drop_if_idle(self, conn: Upstream) -> None:
        raise NotImplementedError

    def redirect(self, e: Entry, frame: bytes) -> bool:
        raise NotImplementedError

    def auth_refused(self, conn: Upstream, reply: bytes) -> None:
        raise NotImplementedError


class Upstream(asyncio.Protocol):
    """One connection from a session to one upstream node."""

    def __init__(self, session: SessionBase, node: int):
        self.session = session
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.obuf: list[bytes] = []
        self.queued = False       # in the session's list of connections to push out
        self.expect = Replies()
        self.rbuf = b""
        self.chunks: list[bytes] = []
        self.have = 0
        self.need = 0
        self.client_id: int | None = None
        self.named = False
        self.subscribed = 0
        self.retired = False
        self.failed = False
        self.cut = False          # the last pub/sub frame was for the proxy itself: not forwarded
        # Not authenticated (failed AUTH, RESET): closed once nothing of the client is in flight on
        # it, so no unnamed connection lingers in the upstream's CLIENT LIST (the RouteIn gate).
        self.drop_idle = False
        # The AUTH gate (``gate``): while an AUTH the proxy sent for the client (replayed on a new
        # connection, or a client's AUTH followed on another node) is unanswered, nothing queued after
        # it is written: the transport waits in ``stash`` (``transport`` is None, so push_out holds
        # everything), ``gate_ends`` are the obuf parts up to each later such AUTH not written yet.
        self.stash: asyncio.Transport | None = None
        self.gate_ends: list[int] = []
        self.gates: list[Entry] = []     # the gating AUTHs not answered yet, oldest first

    # -- sending ------------------------------------------------------------------------------
    def send(self, args: tuple[bytes, ...], entry: Entry | None, requeue: bool = False) -> None:
        """Queue a command; its entry joins the session's reply order (and this connection's)."""
        self.obuf.append(pack_command(args))
        if entry is not None:
            entry.conn = self
            sess = self.session
            if sess.router.cluster:
                if not entry.internal and not requeue:
                    sess.pending.append(entry)
                self.expect.append(entry)
            elif not requeue:
                sess.pending.append(entry)
        self.session.queue_out(self)

    def internal(self, args: tuple[bytes, ...], cb: Callable[[Entry], None] | None = None,
                 remaining: int = 0) -> Entry:
        e = Entry(cb=cb)
        e.internal = True
        e.remaining = remaining
        self.send(args, e)
        return e

    def push_out(self) -> None:
        if self.obuf and self.transport is not None:
            data = b"".join(self.obuf)
            self.obuf.clear()
            self.transport.write(data)

    def gate(self, args: tuple[bytes, ...], cb: Callable[[Entry], None] | None = None,
             refused: Callable[[Entry], None] | None = None, open_if_refused: bool = False) -> None:
        """Send a command that authenticates (HELLO ... AUTH) for the client, and write nothing queued
        after it until its reply is a success: commands pipelined behind a refused AUTH would run as
        whoever the connection was before (``default``). Refused: routing.Routing.auth_refused (or, with
        ``open_if_refused``, when the connection's previous state is the client's too, go on)."""
        def check(e: Entry) -> None:
            if self.failed:
                return
            if self.gates and self.gates[0] is e:
                self.gates.pop(0)
            if (e.reply or b"")[:1] in (b"-", b"!"):
                if refused is not None:
                    refused(e)
                if not open_if_refused:
                    self.session.auth_refused(self, e.reply or b"")
                    return
            elif cb is not None:
                cb(e)
            self._open_gate()
        self.gates.append(self.internal(args, check))
        if self.transport is not None:
            self.push_out()
            self.stash, self.transport = self.transport, None
        else:
            self.gate_ends.append(len(self.obuf))

    def _open_gate(self) -> None:
        t = self.stash
        if t is None:
            return
        if self.gate_ends:
            self._write_first(t, self.gate_ends.pop(0))
        else:
            self.transport, self.stash = t, None
            self.push_out()

    def _write_first(self, t: asyncio.Transport, n: int) -> None:
        t.write(b"".join(self.obuf[:n]))
        del self.obuf[:n]
        self.gate_ends = [end - n for end in self.gate_ends]

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.gate_ends:        # an AUTH gate: only what precedes it goes now
            self.stash = transport  # type: ignore[assignment]
            self._write_first(self.stash, self.gate_ends.pop(0))  # type: ignore[arg-type]
            return
        self.transport = transport  # type: ignore[assignment]
        self.push_out()

    def pause_writing(self) -> None:
        self.session.pause_client_reading()

    def resume_writing(self) -> None:
        self.session.resume_client_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.stash = None
        if not self.retired:
            self.session.upstream_lost(self)

    def data_received(self, data: bytes) -> None:
        sess = self.session
        proxy = sess.proxy
        proxy.bytes_up += len(data)
        proxy.reply_chunks += 1
        if not self.chunks and not self.rbuf and not sess.router.cluster and self._count(data):
            proxy.reply_chunks_counted += 1
            sess.collect()
            sess.kick()
            if self.drop_idle:
                sess.drop_if_idle(self)
            return
        if self.chunks:
            self.chunks.append(data)
            self.have += len(data)
            if self.have < self.need:
                return
            data = b"".join(self.chunks)
            self.chunks = []
        elif self.rbuf:
            data = self.rbuf + data
            self.rbuf = b""
        try:
            if sess.router.cluster:
                pos, end = self._frames_cluster(data)
            else:
                pos, end = self._frames_standalone(data)
        except (ValueError, IndexError):
            log.warning("proxy.upstream_protocol_error", session=sess.id)
            sess.abort("upstream protocol error")
            return
        if pos < len(data):
            if end < -1:
                self.chunks = [data[pos:]]
                self.have = len(data) - pos
                self.need = -end - pos
            else:
                self.rbuf = data[pos:]
        sess.collect()
        sess.kick()
        if self.drop_idle:
            sess.drop_if_idle(self)

    def _count(self, data: bytes) -> bool:
        """The pipelined hot path (standalone, RESP2): when every entry waiting is a run of
        SCALAR_REPLY commands, count the chunk's replies (framing.count_scalars) instead of framing
        each. Only a chunk of whole scalar frames is taken; anything else (a frame split across
        chunks, more replies than asked for) returns False untouched, for _frames_standalone. Replies
        of a write run answered in part are held with the run, as there: the chunk waits whole
        (earlier replies in it too) until the run's marks are delivered."""
        sess = self.session
        if sess.resp3 or self.subscribed:
            return False
        pending = sess.pending
        items = pending.items
        cap = 0
        for i in range(pending.head, len(items)):
            e = items[i]
            if not e.scalar:
                return False
            cap += e.count
        n = count_scalars(data, cap)
        if n <= 0:
            return False
        out = sess.out
        answered_in_part = False
        while n:
            e = pending[0]
            if n < e.count:
                e.count -= n
                answered_in_part = True
                break
            n -= e.count
            e.count = 0
            pending.popleft()
            if e.parts is not None:   # its replies held from earlier chunks go first
                out.extend(e.parts)
                e.parts = None
            if e.marks is not None:
                sess.add_marks(e)
        head = pending[0] if pending else None
        if head is not None and head.parts is not None:
            head.parts.append(data)   # still waiting for the rest of its replies
        elif answered_in_part and head is not None and head.marks is not None:
            head.parts = [data]
        else:
            out.append(data)
        return True

    def _frames_standalone(self, data: bytes) -> tuple[int, int]:
        """Standalone: replies arrive in request order, so the chunk goes to the client as it is,
        minus the replies to the proxy's own commands, plus local replies spliced in at their place."""
        sess = self.session
        pending = sess.pending
        out = sess.out
        n = len(data)
        pos = span = run = 0      # run: where the replies of the run at the head began in ``data``
        end = -1
        find = data.find
        while pos < n:
            t = data[pos]
            if t == 0x2B or t == 0x3A:                     # '+' ':'  one line
                nl = find(b"\r\n", pos)
                if nl < 0:
                    end = -1
                    break
                end = nl + 2
            elif t == 0x24:                                 # '$' bulk
                nl = find(b"\r\n", pos)
                if nl < 0:
                    end = -1
                    break
                size = int(data[pos + 1:nl])
                end = nl + 2 if size < 0 else nl + size + 4
                if end > n:
                    end = -end
                    break
            else:
                end = frame_end(data, pos)
                if end < 0:
                    break
                # RESP3: pub/sub traffic comes only as '>' pushes; an array reply that happens to begin
                # with "message" is a reply. RESP2: subscribe mode is recognised by the first word.
                if t == PUSH or (t == STAR and not sess.resp3
                                 and (self.subscribed or (pending and pending[0].remaining))
                                 and self._pubsub_frame(data[pos:end])):
                    if t == PUSH:
                        self._push(data[pos:end])
                    if self.cut:                            # a confirmation of our own re-subscribe
                        self.cut = False
                        out.append(data[span:pos])
                        span = end
                    pos = end
                    continue
            e = pending[0]
            if e.count:
                # A run of plain commands (fast path): its marks go with its last reply. Until then
                # its replies so far are held (below): a write's reply never leaves unmarked.
                e.count -= 1
                pos = end
                if e.count:
                    continue
                pending.popleft()
                if e.parts is not None:
                    out.append(data[span:run])
                    out.append(b"".join(e.parts))
                    span = run
                    e.parts = None
                if e.marks is not None:
                    sess.add_marks(e)
                run = pos
                if pending:
                    head = pending[0]
                    if head.conn is None and head is not READ:
                        out.append(data[span:pos])
                        span = pos
                        sess.collect()
                continue
            pending.popleft()
            run = end
            if e is not READ:
                if e.internal:
                    out.append(data[span:pos])
                    span = end
                    if e.cb is not None:
                        e.reply = data[pos:end]
                        e.cb(e)
                else:
                    if e.marks is not None:
                        sess.add_marks(e)
                    if e.cb is not None:
                        e.reply = data[pos:end]
                        e.cb(e)
            pos = end
            if pending:
                head = pending[0]
                if head.conn is None and head is not READ:   # local replies due at this point
                    out.append(data[span:pos])
                    span = pos
                    sess.collect()
        if pending and pending[0].count and pending[0].marks is not None and run < pos:
            held = pending[0]             # a run of writes answered in part: hold its replies
            if held.parts is None:
                held.parts = []
            held.parts.append(data[run:pos])
            pos_out = run
        else:
            pos_out = pos
        if span < pos_out:
            out.append(data[span:pos_out])
        return pos, end

    def _frames_cluster(self, data: bytes) -> tuple[int, int]:
        """Cluster: each node's replies fill their entries; the session writes them in request order."""
        sess = self.session
        expect = self.expect
        pos = 0
        end = -1
        while True:
            end = frame_end(data, pos)
            if end < 0:
                break
            t = data[pos]
            if t == PUSH or (t == STAR and not sess.resp3
                             and (self.subscribed or (expect and expect[0].remaining))
                             and self._pubsub_frame(data[pos:end])):
                if t == PUSH:
                    self._push(data[pos:end])
                self.cut = False
            else:
                e = expect.popleft()
                frame = data[pos:end]
                if e.internal:
                    if e.cb is not None:
                        e.reply = frame
                        e.cb(e)
                elif t == MINUS and e.args is not None and sess.redirect(e, frame):
                    pass
                else:
                    e.reply = frame
            pos = end
        return pos, end

    # -- pub/sub --------------------------------------------------------------------------------
    def _queue(self) -> Replies:
        return self.expect if self.session.router.cluster else self.session.pending

    def _confirmation(self, frame: bytes) -> bool:
        """A (un)subscribe confirmation: belongs to the pub/sub entry at the head, if any."""
        self.subscribed = last_int(frame)
        queue = self._queue()
        if queue and queue[0].remaining:
            e = queue[0]
            e.remaining -= 1
            if e.internal:
                self.cut = True
            elif self.session.router.cluster:
                if e.parts is None:
                    e.parts = []
                e.parts.append(frame)
            if e.remaining == 0:
                queue.popleft()
                e.reply = b"".join(e.parts) if e.parts else b""
            return True
        return False

    def _pubsub_frame(self, frame: bytes) -> bool:
        """RESP2 while subscribed: True if this array frame is pub/sub traffic, not a command reply."""
        kind = first_word(frame)
        if kind in CONFIRM_KINDS:
            if not self._confirmation(frame) and self.session.router.cluster:
                self.session.oob(frame)
            return True
        if kind in MESSAGE_KINDS and self.subscribed:
            if self.session.router.cluster:
                self.session.oob(frame)
            return True
        return False

    def _push(self, frame: bytes) -> None:
        if first_word(frame) in CONFIRM_KINDS and self._confirmation(frame):
            return
        if self.session.router.cluster:
            self.session.oob(frame)

    def close(self) -> None:
        self.retired = True
        if self.transport is not None:
            self.transport.close()
        if self.stash is not None:
            self.stash.close()
