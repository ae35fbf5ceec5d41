"""One client connection and its upstream connection(s).

Requests are parsed with libvalkey's reader, re-packed and written to the upstream connection of the
key's node; every request that expects a reply gets an ``Entry`` in the session's ``pending`` queue, in
request order (on the standalone fast path, plain commands are scanned in place, forwarded as received
and share one entry per chunk: ``Session._fast``). Replies are framed (``framing.frame_end``) or
counted, matched to the entries of the connection they came from, and written to the client in request
order. A write's reply is held until its keys were handed over: ``on_marks`` returned (in-process),
or RemoteMarks has them to stream, and then FREEZE waits for the syncer's ack. So by the cutover,
"acknowledged" always implies "marked".

Entries answered by the proxy itself carry a function that computes the reply when the entry reaches
the head of the queue, so local answers (CLIENT GETNAME, CLUSTER SLOTS, NOAUTH ...) see exactly the
state a server would see at that point of the pipeline.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import libvalkey
from mypy_extensions import i64

from .. import logs
from . import framing, scripts
from .commandtable import SUBSCRIBE_FAMILY, CommandSpec, keys_from_getkeys
from .framing import MINUS, PUSH, command_head, command_tail, count_scalars, frame_end, name_sig

try:
    from ._resp import scan_run
except ImportError:      # built without a C compiler (DURABLECACHE_PURE_PYTHON=1)
    from .framing import scan_run

if TYPE_CHECKING:
    from .server import Proxy, Router

log = logs.get("durablecache.proxy")
pack_command: Final = libvalkey.pack_command

STAR: Final = 0x2A
DOLLAR: Final = 0x24
CLIENT_GONE_GRACE: Final = 2.0        # how long replies to in-flight writes are awaited after a client left
CLIENT_GONE_MAX: Final = 30.0         # ... and at most, while a non-blocking write (a long script) is unanswered
COMPACT_AT: Final = 1024              # Replies: taken slots that may stay in its list
UNSAFE: Final = frozenset({b"flushall", b"flushdb", b"swapdb", b"move"})
MESSAGE_KINDS: Final = frozenset({b"message", b"pmessage", b"smessage"})
CONFIRM_KINDS: Final = frozenset({b"subscribe", b"psubscribe", b"ssubscribe",
                           b"unsubscribe", b"punsubscribe", b"sunsubscribe"})
# Module constants are Final: compiled, each use is then a constant, not a module-dict lookup.
FAST_READ: Final = "read"
FAST_NO: Final = "general"
# Commands whose reply is one non-aggregate frame (RESP2) whatever their arguments. A run made only of
# them has its replies counted (framing.count_scalars, in Upstream._count) instead of framed.
SCALAR_REPLY: Final = frozenset(
    b"get set setnx setex psetex getset getdel getex append strlen incr incrby incrbyfloat decr decrby "
    b"del unlink exists touch expire pexpire expireat pexpireat persist ttl pttl expiretime pexpiretime "
    b"getrange setrange getbit setbit bitcount pfadd pfcount hget hset hsetnx hdel hlen hexists hincrby "
    b"hincrbyfloat hstrlen sadd srem scard sismember zadd zrem zcard zscore zincrby zcount lpush rpush "
    b"lpushx rpushx llen lindex lset ltrim lrem mset msetnx".split())
REFUSED: Final = ("ERR durablecache: {} is refused during a migration because its effect cannot be tracked "
                  "key by key; see docs/proxy.md")
SCRIPT_REFUSED: Final = ("ERR durablecache: this script is refused during a migration: {}; the proxy cannot "
                         "check it for writes it could not track key by key; see docs/proxy.md")
SCRIPTS_REMEMBERED: Final = 65536        # checked script SHA1s kept by the proxy (Proxy.script_shas)
NOSCRIPT: Final = b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
# Checked during a migration (scripts.py): the general path then, the fast path otherwise (classify).
SCRIPTING: Final = frozenset({b"eval", b"evalsha", b"fcall", b"eval_ro", b"evalsha_ro", b"fcall_ro"})
Marks = list[tuple[int | None, list[bytes]]]


class Entry:
    """One expected reply. ``reply`` is set when complete; ``fn`` computes a local reply instead."""

    __slots__ = ("reply", "marks", "cb", "fn", "args", "conn", "blocking", "remaining", "parts",
                 "redirects", "internal", "count", "writes", "scalar")

    def __init__(self, marks: Marks | None = None, cb: Callable[[Entry], None] | None = None):
        self.reply: bytes | None = None
        self.marks = marks
        self.cb = cb
        self.fn: Callable[[], bytes] | None = None
        self.args: tuple[bytes, ...] | None = None   # kept for MOVED/ASK retries (cluster)
        self.conn: Upstream | None = None
        self.blocking = False
        self.remaining = 0        # pub/sub confirmations still expected
        self.parts: list[bytes] | None = None
        self.redirects = 0
        self.internal = False     # the proxy's own command: the reply never reaches the client
        self.count = 0            # a run (fast path): replies still expected for its commands
        self.writes = 1           # writes whose marks these are (a run: how many of its commands)
        self.scalar = False       # a run whose every reply is one frame of SCALAR_REPLY


READ: Final = Entry()   # a plain reply (standalone): forwarded as it is, nothing to do when it arrives


class Replies:
    """The entries whose replies are expected, oldest first: a list and the index of its head.
    (collections.deque is no native type for mypyc: every operation on it would be a generic method
    call, several per chunk on the hot path.) A taken entry's slot holds READ until the list empties,
    or until such slots are the larger part of at least COMPACT_AT."""

    __slots__ = ("items", "head")

    def __init__(self) -> None:
        self.items: list[Entry] = []
        self.head = 0

    def __len__(self) -> int:
        return len(self.items) - self.head

    def __bool__(self) -> bool:
        return len(self.items) > self.head

    def __getitem__(self, i: int) -> Entry:
        return self.items[self.head + i]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.items[self.head:])

    def append(self, e: Entry) -> None:
        self.items.append(e)

    def popleft(self) -> Entry:
        items = self.items
        head = self.head
        e = items[head]
        items[head] = READ        # what a taken entry holds (replies, commands, keys) is freed now
        head += 1
        if head == len(items):
            items.clear()
            head = 0
        elif head >= COMPACT_AT and 2 * head >= len(items):
            del items[:head]
            head = 0
        self.head = head
        return e

    def clear(self) -> None:
        self.items.clear()
        self.head = 0


def first_word(frame: bytes) -> bytes:
    """The first element of an array/push frame whose first element is a bulk string, lowercased."""
    nl = frame.find(b"\r\n")
    if nl < 0 or len(frame) <= nl + 1 or frame[nl + 2] != 0x24:   # '$'
        return b""
    nl2 = frame.find(b"\r\n", nl + 2)
    size = int(frame[nl + 3:nl2])
    return frame[nl2 + 2:nl2 + 2 + size].lower()


def last_int(frame: bytes) -> int:
    """The trailing integer of a pub/sub confirmation ``[kind, channel, :count]``."""
    i = frame.rfind(b":", 0, len(frame) - 2)
    try:
        return int(frame[i + 1:-2])
    except ValueError:
        return 0


def hello_id(frame: bytes) -> int | None:
    """The connection id in a HELLO reply (RESP2: a flat array, RESP3: a map)."""
    try:
        reply = parse_frame(frame)
    except libvalkey.ProtocolError:
        return None
    if isinstance(reply, list):
        reply = dict(zip(reply[::2], reply[1::2]))
    if isinstance(reply, dict):
        value = reply.get(b"id")
        if isinstance(value, int):
            return value
    return None


def parse_frame(frame: bytes) -> Any:
    r = libvalkey.Reader()
    r.feed(frame)
    return r.gets()


class Upstream(asyncio.Protocol):
    """One connection from a session to one upstream node."""

    def __init__(self, session: Session, node: int):
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
        whoever the connection was before (``default``). Refused: Session.auth_refused (or, with
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


class Session(asyncio.Protocol):
    """One client connection."""

    def __init__(self, proxy: Proxy, sid: int):
        self.proxy = proxy
        self.id = sid
        self.name_on_upstream = f"{proxy.name_prefix}-{sid}".encode()
        self.router: Router = proxy.router
        self.transport: asyncio.Transport | None = None
        self.reader = libvalkey.Reader()
        self.pending = Replies()
        self.out: list[bytes] = []
        self.batch: dict[int, list[bytes]] = {}
        self.batch_writes = 0
        self.marking = False
        self.delivering: dict[int, list[bytes]] | None = None   # the batch whose marks are in delivery
        self.dirty: list[Upstream] = []     # connections with commands to send (queue_out)
        self.conns: dict[int, Upstream] = {}
        self.held: deque[tuple[bytes, ...]] = deque()
        self.paused = False                 # every new command held (during FLIP)
        self.inflight = 0                   # writes sent whose marks are not delivered yet
        self.closed = False
        self.client_gone = False
        self.boundary = True                # the client's stream is at a command boundary
        # The fast path's last command name (framing.name_sig) and its class, kept across chunks: a
        # client mostly sends one command over and over. Valid while the proxy's fastmap is this one.
        self.fast_map: dict[bytes, Any] = proxy.fastmap
        self.fast_sig: i64 = -1
        self.fast_code: Any = None
        self.fast_scalar = False
        # client-visible state
        self.name: bytes | None = None
        self.db = 0                         # db in effect at the reply position (marks use it)
        self.req_db = 0                     # db in effect at the request position (replay uses it)
        self.resp3 = False
        self.req_proto = 2
        self.authed = not proxy.require_auth
        self.auth_sent = False
        self.auth_pending = 0               # AUTH / HELLO AUTH sent, reply not seen yet
        self.auth_args: tuple[bytes, ...] | None = None
        self.in_multi = False
        self.multi_marks: Marks = []
        self.multi_abort: bytes | None = None     # EXEC's answer when the transaction was broken
        self.multi_error = False
        self.watching = False
        self.watch_broken = False
        self.tx_conn: Upstream | None = None      # cluster: the node a transaction is bound to
        self.multi_sent = False                   # cluster: MULTI was sent on tx_conn
        # Inside MULTI: how many commands were queued, and the proxy's own answers among them (their
        # index in EXEC's array, and the function computing each at EXEC): local_fn, _exec.
        self.multi_count = 0
        self.multi_local: list[tuple[int, Callable[[], bytes]]] = []
        self.subs: tuple[set[bytes], set[bytes], set[bytes]] = (set(), set(), set())
        self.sockname: tuple[str, int] = ("127.0.0.1", 0)

    # ---- client side: asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("sockname")
        if sock:
            self.sockname = (sock[0], sock[1])
        self.proxy.sessions[self.id] = self
        if self.proxy.flipping:
            self.paused = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.client_gone = True
        self.proxy.sessions.pop(self.id, None)
        if self.inflight or self.marking:
            # Replies to writes already sent must be seen (and marked) before the upstream goes. Until
            # then the session stays known to the proxy: freeze() waits for it, unblocks it, and flip()
            # does not move the authoritative side while it may still write to the old one.
            self.proxy.departed.add(self)
            asyncio.get_running_loop().call_later(CLIENT_GONE_GRACE, self._give_up)
            self._maybe_finish()
        else:
            self._close_conns()

    def pause_writing(self) -> None:
        for c in self.conns.values():
            t = c.transport or c.stash        # stash: behind an AUTH gate (Upstream.gate)
            if t is not None:
                t.pause_reading()

    def resume_writing(self) -> None:
        for c in self.conns.values():
            t = c.transport or c.stash
            if t is not None:
                t.resume_reading()

    def pause_client_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_client_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        proxy = self.proxy
        proxy.bytes_in += len(data)
        reader = self.reader
        # Inline commands start a line of their own, so only at a command boundary: the previous chunk
        # must have ended with a complete command (``self.boundary``, tracked by us). The reader's
        # ``has_data()`` alone cannot tell: it is False after a bare array header and also when exactly
        # one unread byte ('*', '$') is buffered, and treating the rest of such a command as inline
        # lines would execute bytes of a value as commands.
        if self.boundary and data[0] != STAR and data[0] != DOLLAR and not reader.has_data():
            data = self._inline(data)
            if not data:
                self._push_all()
                return
        if (not self.router.cluster and not proxy.frozen and not self.held and not self.paused
                and not proxy.key_hold and not self.in_multi and self.authed and self.multi_abort is None):
            self.boundary = self._fast(data)      # feeds the reader what it does not scan itself
        else:
            reader.feed(data)
            self.boundary = self._ends_with(data, self._general())
        self._push_all()

    def _ends_with(self, data: bytes, last: list[bytes] | None) -> bool:
        """Does the chunk end at a command boundary? Only if it ends with its last complete command:
        after a partial command's array header the reader holds no unread bytes either."""
        return last is not None and not self.reader.has_data() and data.endswith(pack_command(tuple(last)))

    def _fast(self, data: bytes) -> bool:
        """The hot path (standalone, nothing special going on): plain reads cost a sentinel in the
        queue, plain writes an entry with their keys; the chunk is forwarded as it came when it holds
        only such commands and starts and ends on a command boundary. Returns whether it ends on one.

        From a command boundary, reads and writes with a fixed key position are scanned in place
        (no Python objects but the name and the key); the reader parses whatever follows them."""
        conn = self.conns.get(0)
        if conn is None or conn.failed:
            conn = self.conn(0)
        proxy = self.proxy
        fastmap = proxy.fastmap
        scalar = proxy.scalar_names
        writes = 0
        run: Entry | None = None          # consecutive plain commands share one entry
        keys: list[bytes] = []
        n = len(data)
        pos = scanned = 0
        # A pipeline mostly repeats one command: the previous name's class is reused when the next
        # name has the same bytes (compared as an integer: no slice, no hashing).
        last_sig: i64 = self.fast_sig
        code: Any = self.fast_code
        is_scalar = self.fast_scalar
        if self.fast_map is not fastmap:      # the proxy flipped: names are classified anew
            self.fast_map = fastmap
            self.fast_sig = last_sig = -1
        if self.boundary:                 # the reader holds nothing of an earlier command
            while pos < n:
                argc, name_start, name_end = command_head(data, pos)
                if argc < 0:
                    break
                sig = name_sig(data, name_start, name_end)
                if sig < 0 or sig != last_sig:
                    name = data[name_start:name_end]
                    code = fastmap.get(name)
                    if code is None:
                        code = proxy.classify(name)
                    is_scalar = name in scalar
                    last_sig = sig
                    self.fast_sig = sig
                    self.fast_code = code
                    self.fast_scalar = is_scalar
                if code is FAST_READ:
                    key_at = 0
                elif type(code) is int:       # a write with its one key at a fixed position
                    key_at = code
                else:
                    break
                end, key_start, key_end = command_tail(data, name_end + 2, argc - 1, key_at)
                if end < 0:
                    break
                if key_start >= 0:
                    keys.append(data[key_start:key_end])
                count: i64 = 1
                # A pipeline mostly repeats one command. When the next command has the same name and
                # the chunk has room for two more like this one, the rest of the run is scanned in one
                # call (scan_run, in C); for fewer, or for another name, the call costs more than it saves.
                if sig >= 0 and n - end >= 2 * (end - pos):
                    next_argc, next_start, next_end = command_head(data, end)
                    if next_argc > 0 and name_sig(data, next_start, next_end) == sig:
                        end, more = scan_run(data, end, name_start, name_end, key_at, keys)
                        count += more
                if run is None:
                    run = self._open_run(conn)
                run.count += count
                if not is_scalar:
                    run.scalar = False
                if key_at:
                    run.writes += count
                    writes += count
                scanned += count
                pos = end
            if pos:
                conn.obuf.append(data if pos == n else data[:pos])
                self.queue_out(conn)
                if pos == n:
                    self._count_fast(run, keys, writes, scanned)
                    return True
        rest = data[pos:] if pos else data
        self.reader.feed(rest)
        gets = self.reader.gets     # bound once: compiled code would look the method up per call
        pending = self.pending
        done: list[list[bytes]] = []
        while True:
            try:
                args = gets()
            except libvalkey.ProtocolError:
                self._protocol_error()
                return False
            if args is False:
                break
            if type(args) is not list or not args:
                self._protocol_error()
                return False
            code = fastmap.get(args[0])
            if code is None:
                code = proxy.classify(args[0])
            if code is FAST_NO:
                conn.obuf.extend([pack_command(tuple(a)) for a in done])
                self.queue_out(conn)
                self._count_fast(run, keys, writes, scanned + len(done))
                self.handle(tuple(args))
                return self._ends_with(rest, self._general() or args)
            if code is not FAST_READ and type(code) is not int and code.blocking:
                if run is not None and run.writes:
                    run.marks = [(None, keys)]
                    keys = []
                run = None
                e = Entry([(None, code.write_keys(args))])
                e.conn = conn
                e.blocking = True
                pending.append(e)
                writes += 1
                done.append(args)
                continue
            if run is None:
                run = self._open_run(conn)
            run.count += 1
            if args[0] not in scalar:
                run.scalar = False
            if code is not FAST_READ:
                if type(code) is int:          # a write with its one key at a fixed position
                    if code < len(args):
                        keys.append(args[code])
                else:
                    keys.extend(code.write_keys(args))
                run.writes += 1
                writes += 1
            done.append(args)
        self._count_fast(run, keys, writes, scanned + len(done))
        if not done:
            return False
        ends = self._ends_with(rest, done[-1])
        if ends and (pos or self.boundary):
            conn.obuf.append(rest)
        else:
            conn.obuf.extend([pack_command(tuple(a)) for a in done])
        self.queue_out(conn)
        return ends

    def _open_run(self, conn: Upstream) -> Entry:
        run = Entry()
        run.conn = conn
        run.writes = 0
        run.scalar = True
        self.pending.append(run)
        return run

    def _count_fast(self, run: Entry | None, keys: list[bytes], writes: int, commands: int) -> None:
        """The fast path's last run gets its keys; the chunk's commands and writes are counted."""
        if run is not None and run.writes:
            run.marks = [(None, keys)]
        self.inflight += writes
        proxy = self.proxy
        proxy.commands += commands
        proxy.writes += writes

    def _general(self) -> list[bytes] | None:
        """The general path; returns the last complete command (None if none)."""
        reader = self.reader
        handle = self.handle
        last = None
        while True:
            try:
                args = reader.gets()
            except libvalkey.ProtocolError:
                self._protocol_error()
                return None
            if args is False:
                return last
            if type(args) is not list or not args:
                self._protocol_error()
                return None
            last = args
            handle(tuple(args))

    def _inline(self, data: bytes) -> bytes:
        """Inline commands (``PING\\r\\n`` from telnet); returns what follows them (RESP)."""
        while data and data[0] != STAR:
            nl = data.find(b"\n")
            if nl < 0:
                self.reader.feed(b"")    # keep it simple: an inline command must arrive whole
                return b""
            words = framing.split_inline(data[:nl].rstrip(b"\r"))
            data = data[nl + 1:]
            if words:
                self.handle(tuple(words))
        return data

    def _protocol_error(self) -> None:
        if self.transport is not None:
            self.transport.write(b"-ERR Protocol error: invalid multibulk\r\n")
            self.transport.close()

    def queue_out(self, conn: Upstream) -> None:
        if not conn.queued:
            conn.queued = True
            self.dirty.append(conn)

    def _push_all(self) -> None:
        dirty = self.dirty
        if dirty:
            for c in dirty:
                c.queued = False
                c.push_out()
            dirty.clear()
        self.collect()
        self.kick()

    # ---- requests -------------------------------------------------------------------------------
    def handle(self, args: tuple[bytes, ...]) -> None:
        """One request, in order: hold it (FREEZE/FLIP) or dispatch it now."""
        proxy = self.proxy
        proxy.commands += 1
        if self.held or self.paused:
            self.held.append(args)
            return
        spec = proxy.table.lookup(args)
        if proxy.frozen and self._is_write(args, spec):
            proxy.held_total += 1
            self.held.append(args)
            return
        if proxy.key_hold and self._writes_held_key(args, spec):
            proxy.key_held_total += 1
            self.held.append(args)
            return
        self.dispatch(args, spec)

    def _writes_held_key(self, args: tuple[bytes, ...], spec: CommandSpec | None) -> bool:
        """Key-scoped hold (Proxy.hold_keys): does this request write a held key?"""
        proxy = self.proxy
        if self.in_multi and args[0].lower() == b"exec":
            # The transaction's writes happen at EXEC (a write queued after the hold began was held
            # itself, and EXEC waits behind it anyway).
            db = self.req_db
            for sel, keys in self.multi_marks:
                if sel is not None:
                    db = sel
                if keys and proxy.holds(db, keys):
                    return True
            return False
        if spec is None or not spec.hold:
            return False
        if spec.unresolved(args):
            return True       # its keys are known only to the server: held while any key is (rare)
        return proxy.holds(self.req_db, spec.write_keys(args))

    def _is_write(self, args: tuple[bytes, ...], spec: CommandSpec | None) -> bool:
        if spec is not None and spec.hold:
            return True
        # EXEC (and DISCARD, which ends it) of a transaction that queued writes is the write.
        return self.in_multi and bool(self.multi_marks) and args[0].lower() in (b"exec", b"discard")

    def release(self) -> None:
        """Re-run held commands in order until one must be held again (still frozen / paused)."""
        held = self.held
        self.held = deque()
        while held:
            args = held.popleft()
            self.handle(args)
            if self.held:             # held again: keep the rest behind it, in order
                self.held.extend(held)
                break
        self._push_all()

    def dispatch(self, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
        name = args[0].lower()
        special = SPECIAL.get(name)
        if special is not None:
            special(self, args, spec)
            return
        self.forward(args, spec)

    def forward(self, args: tuple[bytes, ...], spec: CommandSpec | None, cb: Any = None) -> None:
        if not self.authed and not self.auth_sent:
            self.local_error(framing.NOAUTH)
            return
        if self.multi_abort is not None:
            self.local(framing.QUEUED)
            return
        conn = self.conn_for(args, spec)
        if conn is None:
            return
        if self.in_multi:
            if spec is not None and spec.hold:
                if self.proxy.migrating and spec.unresolved(args):
                    self.multi_error = True
                    self.local_error(framing.error(
                        f"ERR durablecache: {args[0].decode(errors='replace').upper()} with keys only the "
                        "server can resolve is refused inside MULTI during a migration; see docs/proxy.md"))
                    return
                self.multi_marks.append((None, spec.write_keys(args)))
            entry = Entry(cb=cb)
        elif spec is not None and spec.hold:
            unresolved = spec.unresolved(args)
            marks: Marks = [(None, [] if unresolved else spec.write_keys(args))]
            entry = Entry(marks, cb)
            entry.blocking = spec.blocking
            self.inflight += 1
            self.proxy.writes += 1
            if unresolved:
                self._getkeys(conn, args, spec, marks)
        else:
            entry = Entry(cb=cb)
            entry.blocking = spec is not None and spec.blocking    # XREAD BLOCK, WAIT: see _unblock
        if self.router.cluster:
            entry.args = args
        conn.send(args, entry)
        if self.in_multi:
            self.multi_count += 1

    def _getkeys(self, conn: Upstream, args: tuple[bytes, ...], spec: CommandSpec, marks: Marks) -> None:
        """Ask the server for the keys of a command whose key specs are incomplete (SORT ... STORE)."""
        def got(e: Entry) -> None:
            marks[0] = (None, keys_from_getkeys(parse_frame(e.reply or b""), spec))
        conn.internal(self.proxy.table.getkeys_cmd + args, got)

    # ---- routing --------------------------------------------------------------------------------
    def conn_for(self, args: tuple[bytes, ...], spec: CommandSpec | None) -> Upstream | None:
        router = self.router
        if not router.cluster:
            return self.conn(0)
        node = -1
        if spec is not None:
            keys = spec.route_keys(args)
            if keys:
                slot = router.slot_of(keys)
                if slot < 0:
                    self.local_error(b"-CROSSSLOT Keys in request don't hash to the same slot\r\n")
                    if self.in_multi:
                        self.multi_error = True
                    return None
                node = router.owner[slot]
        tx = self.tx_conn
        if tx is not None and tx.failed:      # its AUTH was refused (auth_refused)
            tx = self.tx_conn = None
        if not self.in_multi:
            return self.conn(max(node, 0))
        # Inside MULTI every command goes to the transaction's connection (bound by WATCH or by the
        # first command with keys; keyless commands go there too), queued by the server after MULTI.
        if tx is None:
            tx = self.tx_conn = self.conn(max(node, 0))
        elif node >= 0 and node != tx.node:
            self.multi_error = True
            self.local_error(b"-CROSSSLOT Keys in request don't hash to the same slot\r\n")
            return None
        if not self.multi_sent:
            self.multi_sent = True
            tx.internal((b"MULTI",))
        return tx

    def conn(self, node: int, replay_auth: bool = True) -> Upstream:
        conn = self.conns.get(node)
        if conn is None or conn.failed:
            conn = Upstream(self, node)
            self.conns[node] = conn
            self._replay(conn, replay_auth)
            asyncio.get_running_loop().create_task(self._open(conn))
        return conn

    async def _open(self, conn: Upstream) -> None:
        endpoint = self.router.nodes[conn.node]
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, endpoint.host, endpoint.port,
                                       ssl=self.proxy.upstream_ssl(endpoint),
                                       server_hostname=endpoint.tls_hostname if endpoint.tls else None),
                self.proxy.connect_timeout)
        except (TimeoutError, OSError) as exc:
            log.warning("proxy.upstream_unreachable", session=self.id, upstream=endpoint.address,
                        reason=str(exc) or type(exc).__name__)
            conn.failed = True
            self.upstream_lost(conn)

    def _replay(self, conn: Upstream, replay_auth: bool = True) -> None:
        """A new upstream connection gets this client's state: AUTH, protocol, db, and our name.
        The AUTH goes as ``HELLO <proto> AUTH <user> <pass> SETNAME <our name>`` (its reply carries the
        connection's id): one command every user may run, so the proxy's housekeeping never shows up
        as the client's ACL denials; and it gates the connection (Upstream.gate): if it is refused,
        the client's commands on this connection fail with the server's error (auth_refused), none
        runs as ``default``. Without ``replay_auth`` (the connection opened for a client's AUTH, which
        is its gate) the previous AUTH is not replayed."""
        auth_args = self.auth_args if replay_auth else None

        def named(e: Entry) -> None:
            conn.named = (e.reply or b"").startswith(b"+")

        def got_id(e: Entry) -> None:
            r = e.reply or b""
            if r.startswith(b":"):
                conn.client_id = int(r[1:-2])
        if auth_args is not None:
            conn.gate(self.hello_auth(auth_args), self.hello_done(conn))
        elif self.req_proto == 3:
            conn.internal((b"HELLO", b"3"))
        if self.req_db and not self.router.cluster:
            conn.internal((b"SELECT", str(self.req_db).encode()))
        if auth_args is None and (self.authed or self.auth_sent):
            conn.internal((b"CLIENT", b"SETNAME", self.name_on_upstream), named)
            conn.internal((b"CLIENT", b"ID"), got_id)
        for kind, verb in ((0, b"SUBSCRIBE"), (1, b"PSUBSCRIBE")):
            if self.subs[kind] and conn.node == 0:
                conn.internal((verb, *sorted(self.subs[kind])), remaining=len(self.subs[kind]))
        if self.subs[2]:
            for ch in sorted(self.subs[2]):
                if self.router.owner_of(ch) == conn.node:
                    conn.internal((b"SSUBSCRIBE", ch), remaining=1)

    def hello_auth(self, auth: tuple[bytes, ...]) -> tuple[bytes, ...]:
        """``AUTH [user] pass`` as the HELLO that authenticates, keeps the protocol and names."""
        user, password = (b"default", auth[1]) if len(auth) == 2 else (auth[1], auth[2])
        return (b"HELLO", str(self.req_proto).encode(), b"AUTH", user, password,
                b"SETNAME", self.name_on_upstream)

    @staticmethod
    def hello_done(conn: Upstream) -> Callable[[Entry], None]:
        """A successful HELLO ... SETNAME: the connection is named; its id is in the reply."""
        def done(e: Entry) -> None:
            conn.named = True
            conn.client_id = hello_id(e.reply or b"")
        return done

    def auth_refused(self, conn: Upstream, reply: bytes) -> None:
        """An AUTH the proxy sent for the client on ``conn`` (Upstream.gate) was refused: nothing
        after it was written. Every request of the client waiting behind it is answered with the
        server's error, up to the next such AUTH on the connection (a client's AUTH queued behind a
        replayed one), which is then written and decides in turn. If there is none, the connection
        goes, and the next request for its node opens a new one (and replays the AUTH again). Never
        does a request run as the connection's previous user."""
        log.warning("proxy.upstream_auth_refused", session=self.id, upstream=self.router.nodes[conn.node].address,
                    reason=reply[:-2].decode(errors="replace"))
        nxt = conn.gates[0] if conn.gates else None
        if self.tx_conn is conn and self.in_multi:
            self.multi_error = True
        if nxt is None:
            conn.failed = True
            conn.obuf.clear()
            conn.gate_ends.clear()
            if self.tx_conn is conn:
                self.tx_conn = None
        elif conn.stash is not None and conn.gate_ends:
            end = conn.gate_ends.pop(0)
            auth = conn.obuf[end - 1]            # the next gating AUTH: it goes, nothing before it
            del conn.obuf[:end]
            conn.gate_ends = [e - end for e in conn.gate_ends]
            conn.stash.write(auth)
        if self.router.cluster:
            expect = conn.expect
            while expect and expect[0] is not nxt:
                e = expect.popleft()
                e.reply = reply
                if e.internal and e.cb is not None:
                    e.cb(e)
        else:
            pending = self.pending
            kept = pending.items[:pending.head]
            items = pending.items[pending.head:]
            for i, e in enumerate(items):
                if e is nxt:
                    kept.extend(items[i:])
                    break
                if e is READ:
                    e = Entry()
                    e.reply = reply
                elif e.conn is conn and e.reply is None:
                    if e.internal:
                        if e.cb is not None:
                            e.reply = reply
                            e.cb(e)
                        continue
                    e.reply = reply * e.count if e.count else reply
                    e.count = 0
                    e.parts = None
                kept.append(e)
            pending.items = kept
        if nxt is None:
            conn.close()

    def name_after_auth(self, conn: Upstream) -> None:
        """After a client's AUTH/HELLO AUTH, name the connection (fails harmlessly if AUTH failed)."""
        if conn.named:
            return

        def named(e: Entry) -> None:
            conn.named = (e.reply or b"").startswith(b"+")

        def got_id(e: Entry) -> None:
            r = e.reply or b""
            if r.startswith(b":"):
                conn.client_id = int(r[1:-2])
        conn.internal((b"CLIENT", b"SETNAME", self.name_on_upstream), named)
        conn.internal((b"CLIENT", b"ID"), got_id)

    def redirect(self, e: Entry, frame: bytes) -> bool:
        """Follow -MOVED / -ASK for a cluster command; False to pass the error to the client."""
        if not (frame.startswith(b"-MOVED ") or frame.startswith(b"-ASK ")) or e.redirects >= 5:
            return False
        if self.in_multi and e.conn is self.tx_conn:
            return False
        parts = frame[1:-2].split(b" ")
        host, _, port = parts[2].rpartition(b":")
        node = self.proxy.node_index(host.decode() or self.router.nodes[0].host, int(port))
        e.redirects += 1
        conn = self.conn(node)
        if e.conn is self.tx_conn and not self.in_multi and not self.multi_sent:
            self.tx_conn = conn       # a WATCH that moved: the transaction follows it
        if parts[0] == b"ASK":
            conn.internal((b"ASKING",))
        else:
            self.proxy.refresh_topology()
        assert e.args is not None
        conn.send(e.args, e, requeue=True)
        conn.push_out()
        return True

    # ---- replies --------------------------------------------------------------------------------
    def local(self, reply: bytes) -> None:
        e = Entry()
        e.reply = reply
        self.pending.append(e)

    def local_error(self, reply: bytes) -> None:
        self.local(reply)

    def local_fn(self, fn: Callable[[], bytes]) -> None:
        """A reply the proxy computes when it is due. Inside MULTI it is a queued command: +QUEUED
        now, and its reply is computed at EXEC, in its place in EXEC's array (_exec)."""
        if self.in_multi:
            if self.multi_abort is None:
                self.multi_local.append((self.multi_count, fn))
                self.multi_count += 1
            self.local(framing.QUEUED)
            return
        e = Entry()
        e.fn = fn
        self.pending.append(e)

    def oob(self, frame: bytes) -> None:
        """Out-of-band traffic (pub/sub messages, pushes): after every reply completed before it."""
        self.collect()
        self.out.append(frame)

    def add_marks(self, e: Entry) -> None:
        """A write's reply arrived: its keys join the batch delivered before the reply is written.
        The batch takes the entry's key lists over (the entry is done with them)."""
        db = self.db
        batch = self.batch
        for sel, keys in e.marks or ():
            if sel is not None:
                db = sel
            if keys:
                lst = batch.get(db)
                if lst is None:
                    batch[db] = keys
                else:
                    lst.extend(keys)
        self.batch_writes += e.writes

    def collect(self) -> None:
        """Move completed replies at the head of the queue to ``out``; gather their marks."""
        pending = self.pending
        out = self.out
        while pending:
            e = pending[0]
            if e.reply is None:
                if e.fn is None:
                    break
                e.reply = e.fn()
            pending.popleft()
            if e.marks is not None:
                self.add_marks(e)
            if e.cb is not None:
                e.cb(e)
            out.append(e.reply)

    def kick(self) -> None:
        """Write what is ready to the client — after the marks of the writes in it were handed over."""
        if self.marking:
            return
        if self.batch_writes:
            batch, writes = self.batch, self.batch_writes
            self.batch, self.batch_writes = {}, 0
            settled = self.proxy.marks_now(batch, writes)
            if settled is None:       # delivery under way: marks_done writes these replies
                out, self.out = self.out, []
                self.marking = True
                self.delivering = batch
                self.proxy.submit_marks(self, batch, writes, out)
                return
            self.inflight -= writes
            if not settled:
                self.abort("marks could not be delivered")
                return
        out = self.out
        if out:
            data = b"".join(out)      # one part: that very object, not a copy
            out.clear()
            if self.transport is not None:
                self.transport.write(data)
                self.proxy.bytes_out += len(data)
        if self.client_gone:
            self._maybe_finish()

    def marks_done(self, ok: bool, writes: int, out: list[bytes]) -> None:
        """Called by the proxy once the marks of ``writes`` writes were delivered (or failed)."""
        self.inflight -= writes
        self.marking = False
        self.delivering = None
        if not ok:
            self.abort("marks could not be delivered")
            return
        if out and self.transport is not None:
            data = b"".join(out)
            self.transport.write(data)
            self.proxy.bytes_out += len(data)
        self.collect()
        self.kick()

    # ---- endings --------------------------------------------------------------------------------
    def upstream_lost(self, conn: Upstream) -> None:
        """The upstream closed (server gone, QUIT): mark every write that may have happened, then close."""
        if self.closed:
            return
        if self.transport is not None and not conn.failed:
            log.info("proxy.upstream_closed", session=self.id)
        self.collect()
        self._mark_unanswered()
        self._close_client_after_flush()

    def _mark_unanswered(self) -> None:
        """Conservative: a write sent without a reply may have been applied; mark its keys."""
        for e in self.pending:
            if e.marks is not None and e.reply is None:
                for sel, keys in e.marks:
                    if keys:
                        self.batch.setdefault(self.db if sel is None else sel, []).extend(keys)
                self.batch_writes += e.writes
                e.marks = None
        self.pending.clear()
        for c in self.conns.values():
            c.expect.clear()

    def _close_client_after_flush(self) -> None:
        self.closed = True
        if self.batch_writes and not self.marking:
            self.kick()
        loop = asyncio.get_running_loop()

        async def finish() -> None:
            for _ in range(200):        # bounded: at most ~10 s for marks in delivery
                if not self.marking and not self.batch_writes:
                    break
                await asyncio.sleep(0.05)
            if self.transport is not None:
                if self.out:
                    self.transport.write(b"".join(self.out))
                    self.out = []
                self.transport.close()
            self._close_conns()
        loop.create_task(finish())

    def abort(self, why: str) -> None:
        log.warning("proxy.session_aborted", session=self.id, reason=why)
        self.out = []
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._close_conns()

    def _maybe_finish(self) -> None:
        if self.client_gone and not self.inflight and not self.marking:
            self._close_conns()

    def _give_up(self, waited: float = CLIENT_GONE_GRACE) -> None:
        if self.conns and (self.inflight or self.marking):
            if waited < CLIENT_GONE_MAX and any(e.marks is not None and e.reply is None and not e.blocking
                                                for e in self.pending):
                # Closing the connection would not stop a running write (a script): it could land
                # after its conservative mark was copied. Keep waiting for its reply (bounded).
                asyncio.get_running_loop().call_later(CLIENT_GONE_GRACE, self._give_up,
                                                      waited + CLIENT_GONE_GRACE)
                return
            self._close_conns()
            self._mark_unanswered()
            self.kick()

    def drop_if_idle(self, conn: Upstream) -> None:
        """Close an unauthenticated upstream connection once none of the client's requests is on it;
        the next AUTH opens a new one (named right after it)."""
        if self.authed or self.conns.get(conn.node) is not conn:
            conn.drop_idle = False
            return
        queue = conn.expect if self.router.cluster else self.pending
        if any(e.conn is conn for e in queue):
            return
        del self.conns[conn.node]
        if self.tx_conn is conn:
            self.tx_conn = None
        conn.close()

    def auth_failed(self, conn: Upstream) -> None:
        """An AUTH / HELLO AUTH was refused: unless still authenticated (as before it), later requests
        get NOAUTH from the proxy and the unnamed upstream connection goes."""
        if self.authed:
            return
        if not self.auth_pending:
            self.auth_sent = False
        if not conn.named:
            conn.drop_idle = True

    def _close_conns(self) -> None:
        for c in self.conns.values():
            c.close()
        self.conns.clear()
        self.proxy.departed.discard(self)

    # ---- FLIP -----------------------------------------------------------------------------------
    def quiet(self) -> bool:
        return not self.pending and not self.marking and not self.batch_writes

    def reattach(self, router: Router) -> None:
        """Move to the new upstream: new connections get this client's state replayed lazily."""
        for c in self.conns.values():
            c.close()
        self.conns.clear()
        self.router = router
        self.tx_conn = None
        self.multi_sent = False
        self.req_db = self.db
        if self.in_multi:
            self.multi_abort = framing.null_array(self.resp3)
        if self.watching:
            self.watch_broken = True
        if any(self.subs):
            self.conn(0)    # re-subscribe now, not on the next command
            for ch in self.subs[2]:
                self.conn(self.router.owner_of(ch))


# ---- the commands the proxy handles itself (or watches on their way) -------------------------------

def _auth(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if _refused_in_multi(s, args):
        return
    previous = s.auth_args
    existing = s.conns.get(0)
    fresh = existing is None or existing.failed
    # A new connection is opened for this AUTH, which is then its gate (not the previous AUTH: that
    # one may be refused where this one is not, e.g. after FLIP). Its refusal: Session.auth_refused.
    # On a connection whose replayed AUTH is still unanswered it is a gate too (auth_refused).
    conn = s.conn(0, replay_auth=not fresh)
    gated = fresh or bool(conn.gates)
    s.auth_args = args
    s.auth_sent = True
    s.auth_pending += 1

    def done(e: Entry) -> None:
        s.auth_pending -= 1
        if (e.reply or b"").startswith(b"+"):
            s.authed = True
            conn.drop_idle = False
        else:
            s.auth_args = previous
            s.auth_failed(conn)
    entry = Entry(cb=done)
    # AUTH <user> <pass> goes as HELLO ... AUTH ... SETNAME: an ACL user may be refused CLIENT
    # SETNAME/ID (each refusal in the server's ACL LOG as the user's). The client gets AUTH's answer:
    # +OK, or the server's error.
    hello = len(args) == 3

    def answered(e: Entry) -> None:
        r = e.reply or b""
        if r[:1] in (b"-", b"!"):
            entry.reply = r
            return
        entry.reply = framing.OK
        if hello:
            conn.named = True
            conn.client_id = hello_id(r)
    sent = s.hello_auth(args) if hello else args
    if gated:
        # Refused: what was pipelined behind it runs as before it (the server's way) when that was
        # no AUTH of the client's (``default``, or not authenticated: NOAUTH from the server).
        conn.gate(sent, answered, answered, open_if_refused=previous is None)
    elif hello:
        conn.internal(sent, answered)
    else:
        conn.send(args, entry)
    if gated or hello:
        s.pending.append(entry)
    if not hello:
        s.name_after_auth(conn)
    _follow_auth(s, conn, args)


def _follow_auth(s: Session, conn: Upstream, args: tuple[bytes, ...]) -> None:
    """Cluster: every other open node connection authenticates too, behind an AUTH gate."""
    if len(args) not in (2, 3):
        return
    for node, other in list(s.conns.items()):
        if other is conn:
            continue
        if other.failed:
            del s.conns[node]     # reopened when needed, with the AUTH replayed
            continue
        other.gate(s.hello_auth(args), s.hello_done(other))


def _refused_in_multi(s: Session, args: tuple[bytes, ...]) -> bool:
    """HELLO and (un)subscribing inside MULTI take effect at EXEC, behind the proxy's back (which
    protocol the server speaks, whether pub/sub messages may arrive): refused, and the transaction
    with them, as the server does for a command it rejects while queuing."""
    if not s.in_multi:
        return False
    s.multi_error = True
    s.local(framing.error(f"ERR durablecache: {args[0].decode(errors='replace').upper()} inside MULTI is "
                          "not supported through the proxy; see docs/proxy.md"))
    return True


def _hello(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if _refused_in_multi(s, args):
        return
    fwd: list[bytes] = [args[0]]
    proto: int | None = None
    auth: tuple[bytes, ...] | None = None
    name: bytes | None = None
    i = 1
    if len(args) > 1:
        fwd.append(args[1])
        try:
            proto = int(args[1])
        except ValueError:
            proto = None
        i = 2
    while i < len(args):
        opt = args[i].lower()
        if opt == b"auth" and i + 2 < len(args):
            auth = (b"AUTH", args[i + 1], args[i + 2])
            fwd += [args[i], args[i + 1], args[i + 2]]
            i += 3
        elif opt == b"setname" and i + 1 < len(args):
            name = args[i + 1]
            i += 2
        else:
            fwd.append(args[i])
            i += 1
    if auth is None and not s.authed and not s.auth_sent:
        s.local(b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                b"HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
                b"select the RESP protocol version at the same time\r\n")
        return
    existing = s.conns.get(0)
    fresh = auth is not None and (existing is None or existing.failed)
    conn = s.conn(0, replay_auth=not fresh)     # as in _auth: a new connection's gate is this AUTH
    gated = auth is not None and (fresh or bool(conn.gates))
    previous = s.auth_args
    if auth is not None:
        s.auth_args = auth
        s.auth_sent = True
        s.auth_pending += 1
    if proto in (2, 3):
        s.req_proto = proto

    def done(e: Entry) -> None:
        r = e.reply or b""
        if auth is not None:
            s.auth_pending -= 1
        if r[:1] in (b"-", b"!"):
            s.auth_args = previous
            s.req_proto = 3 if s.resp3 else 2
            if auth is not None:
                s.auth_failed(conn)
            return
        if proto in (2, 3):
            s.resp3 = proto == 3
        if auth is not None:
            s.authed = True
            conn.drop_idle = False
            conn.named = True
            conn.client_id = hello_id(r)
        if name is not None:
            s.name = name or None
    if auth is not None:
        # Named by the same HELLO (a SETNAME of our own, the client's is kept by the proxy): no
        # CLIENT SETNAME/ID that an ACL user may be refused.
        fwd += [b"SETNAME", s.name_on_upstream]
    entry = Entry(cb=done)
    if gated:
        def answered(e: Entry) -> None:
            entry.reply = e.reply
        conn.gate(tuple(fwd), answered, answered, open_if_refused=previous is None)
        s.pending.append(entry)
    else:
        conn.send(tuple(fwd), entry)
    if auth is not None:
        _follow_auth(s, conn, auth)
    else:
        for other in s.conns.values():
            if other is not conn and not other.failed:
                other.internal(tuple(fwd))


def _valid_name(name: bytes) -> bool:
    return all(33 <= c <= 126 for c in name)


def _client(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    sub = args[1].lower() if len(args) > 1 else b""
    if sub == b"setname" and len(args) == 3:
        name = args[2]

        def setname() -> bytes:
            if not s.authed:
                return framing.NOAUTH
            if not _valid_name(name):
                return b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
            s.name = name or None
            return framing.OK
        s.local_fn(setname)
        return
    if sub == b"getname" and len(args) == 2:
        s.local_fn(lambda: framing.NOAUTH if not s.authed else framing.bulk(s.name, s.resp3))
        return
    if sub == b"reply" and len(args) == 3 and args[2].lower() != b"on":
        s.local(framing.error("ERR durablecache: CLIENT REPLY OFF/SKIP is not supported through the proxy"))
        return
    s.forward(args, spec)


def _select(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    try:
        db = int(args[1]) if len(args) == 2 else -1
    except ValueError:
        db = -1
    if s.in_multi:
        if db >= 0 and s.multi_abort is None:
            s.multi_marks.append((db, []))
        s.forward(args, spec)
        return
    if db >= 0:
        s.req_db = db

    def done(e: Entry) -> None:
        if (e.reply or b"").startswith(b"+"):
            s.db = db
        else:
            s.req_db = s.db
    s.forward(args, spec, done)


def _multi(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if s.in_multi:
        s.local(b"-ERR MULTI calls can not be nested\r\n")
        return
    if not s.authed and not s.auth_sent:
        s.local(framing.NOAUTH)
        return
    s.in_multi = True
    s.multi_marks = []
    s.multi_error = False
    s.multi_count = 0
    s.multi_local = []
    if s.watch_broken:
        s.multi_abort = framing.null_array(s.resp3)
    if s.multi_abort is not None:
        s.local(framing.OK)
        return
    if s.router.cluster:
        # Cluster: MULTI goes to the transaction's node: the WATCHed one, now; otherwise the node of
        # the first command queued (conn_for). The client's +OK is the proxy's.
        tx = s.tx_conn
        if tx is not None and not tx.failed:
            s.multi_sent = True
            tx.internal((b"MULTI",))
        s.local(framing.OK)
        return
    s.forward(args, spec)
    s.multi_count = 0             # MULTI itself is no queued command


def _end_multi(s: Session) -> None:
    s.in_multi = False
    s.multi_marks = []
    s.multi_abort = None
    s.multi_error = False
    s.multi_count = 0
    s.multi_local = []
    s.watching = False
    s.watch_broken = False
    if s.router.cluster:
        s.tx_conn = None
        s.multi_sent = False


def splice(reply: bytes, local: list[tuple[int, Callable[[], bytes]]]) -> bytes:
    """EXEC's array with the proxy's own answers (CLIENT GETNAME ... queued inside MULTI) put in their
    places; an aborted (null) or refused EXEC is passed on as it is."""
    if not reply.startswith(b"*") or reply.startswith(b"*-"):
        return reply
    nl = reply.find(b"\r\n")
    frames: list[bytes] = []
    pos = nl + 2
    for _ in range(int(reply[1:nl])):
        end = frame_end(reply, pos)
        frames.append(reply[pos:end])
        pos = end
    for index, fn in local:
        frames.insert(index, fn())
    return b"*%d\r\n" % len(frames) + b"".join(frames)


def _exec(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if not s.in_multi:
        s.local(b"-ERR EXEC without MULTI\r\n")
        return
    marks = s.multi_marks
    abort = s.multi_abort
    error = s.multi_error
    tx_conn = s.tx_conn
    sent = s.multi_sent
    local = s.multi_local
    count = s.multi_count
    _end_multi(s)
    if abort is not None:           # broken by FLIP: as if a watched key was touched
        s.local(abort)
        return
    if s.router.cluster and not sent:         # nothing queued on a server
        if error:
            s.local(b"-EXECABORT Transaction discarded because of previous errors.\r\n")
            return
        if tx_conn is None:
            s.local(b"*%d\r\n" % count + b"".join(fn() for _, fn in local))
            return
        # WATCHed (MULTI not sent: its connection was replaced): an empty transaction on it.
        tx_conn.internal((b"MULTI",))
    if error:
        (tx_conn or s.conn(0)).internal((b"DISCARD",))
        s.local(b"-EXECABORT Transaction discarded because of previous errors.\r\n")
        return
    conn = tx_conn or s.conn(0)
    final_db = next((sel for sel, _ in reversed(marks) if sel is not None), None)

    def done(e: Entry) -> None:
        if final_db is not None and (e.reply or b"").startswith(b"*") and e.reply != b"*-1\r\n":
            s.db = final_db
    if any(keys for _, keys in marks) or final_db is not None:
        entry = Entry(marks, done)
        s.inflight += 1
        s.proxy.writes += 1
    else:
        entry = Entry(cb=done)
    if local:
        # EXEC's reply is taken by the proxy (internal) and given to the client with the proxy's own
        # answers spliced in: ``entry`` (with the marks) is due once it is there.
        def answered(e: Entry) -> None:
            entry.reply = splice(e.reply or b"", local)
        conn.internal(args, answered)
        s.pending.append(entry)
        return
    if s.router.cluster:
        entry.args = args
    conn.send(args, entry)


def _discard(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if not s.in_multi:
        s.local(b"-ERR DISCARD without MULTI\r\n")
        return
    abort, tx_conn, sent = s.multi_abort, s.tx_conn, s.multi_sent
    _end_multi(s)
    if abort is not None or (s.router.cluster and (tx_conn is None or not sent)):
        if tx_conn is not None:
            tx_conn.internal((b"UNWATCH",))      # DISCARD unwatches
        s.local(framing.OK)
        return
    entry = Entry()
    (tx_conn or s.conn(0)).send(args, entry)


def _watch(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if s.in_multi:
        s.local(b"-ERR WATCH inside MULTI is not allowed\r\n")
        return
    if s.router.cluster:
        # All of a transaction goes to one connection: WATCHed keys must be on one node (in one slot
        # per WATCH, as for a cluster server), and that node is then the transaction's.
        conn = s.conn_for(args, spec)
        if conn is None:
            return
        if s.tx_conn is not None and conn is not s.tx_conn:
            s.local(b"-CROSSSLOT Keys in request don't hash to the same slot\r\n")
            return
        s.tx_conn = conn
        s.watching = True
        entry = Entry()
        entry.args = args       # MOVED is followed (redirect), and the transaction with it
        conn.send(args, entry)
        return
    s.watching = True
    s.forward(args, spec)


def _unwatch(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if s.in_multi:
        s.forward(args, spec)     # queued: the server's own answer
        return
    s.watching = False
    s.watch_broken = False
    if s.router.cluster:
        conn, s.tx_conn = s.tx_conn, None
        if conn is None:
            s.local(framing.OK)
            return
        conn.send(args, Entry())
        return
    s.forward(args, spec)


def _reset(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    def done(e: Entry) -> None:
        s.db = 0
        s.resp3 = False
        s.name = None
        s.authed = not s.proxy.require_auth
    s.req_db = 0
    s.req_proto = 2
    s.auth_args = None
    s.auth_sent = False
    _end_multi(s)
    s.tx_conn = None
    for group in s.subs:
        group.clear()
    for node, c in list(s.conns.items()):
        if c.failed:             # refused AUTH (auth_refused): nothing to reset there
            del s.conns[node]
    if not s.conns:
        def reset_locally() -> bytes:
            done(Entry())
            return b"+RESET\r\n"
        s.local_fn(reset_locally)
        return
    require_auth = s.proxy.require_auth
    for node, conn in s.conns.items():
        def reset_conn(e: Entry, conn: Upstream = conn, first: bool = node == 0) -> None:
            # At the reply's position (earlier callbacks may still set ``named``): the server cleared
            # the name and, with a password, de-authenticated the connection: it goes when idle.
            if require_auth:
                conn.named = False
                conn.drop_idle = True
            if first:
                done(e)
        if node == 0 or not s.router.cluster:
            conn.send(args, Entry(cb=reset_conn))
        else:
            conn.internal(args, reset_conn)
        if not require_auth:
            conn.named = False
            s.name_after_auth(conn)


def _subscribe(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if _refused_in_multi(s, args):
        return
    name = args[0].lower()
    kind = SUBSCRIBE_FAMILY[name]
    group = s.subs[kind]
    channels = args[1:]
    # Authentication first: a refused SUBSCRIBE must not be remembered (and replayed at AUTH). A
    # SUBSCRIBE without channels gets its arity error first, as from the server.
    if (channels or name.startswith((b"unsub", b"punsub", b"sunsub"))) and not s.authed and not s.auth_sent:
        s.local(framing.NOAUTH)
        return
    if name.startswith((b"unsub", b"punsub", b"sunsub")):
        if channels:
            count = len(channels)
            group.difference_update(channels)
        else:
            if kind == 2 and s.router.cluster:
                s.local(framing.error("ERR durablecache: SUNSUBSCRIBE needs channel names through the "
                                      "proxy in cluster mode"))
                return
            count = max(1, len(group))
            group.clear()
    else:
        if not channels:
            s.local(framing.error(f"ERR wrong number of arguments for '{name.decode()}' command"))
            return
        count = len(channels)
        group.update(channels)
    if s.router.cluster and kind == 2:
        conn = s.conn_for(args, spec)
        if conn is None:
            return
    else:
        conn = s.conn(0)
    entry = Entry()
    entry.remaining = count
    conn.send(args, entry)


def _refuse_if_migrating(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if s.proxy.migrating:
        if s.in_multi:
            s.multi_error = True
        s.local(framing.error(REFUSED.format(args[0].decode(errors="replace").upper())))
        return
    s.forward(args, spec)


def _copy(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if s.proxy.migrating and any(a.lower() == b"db" for a in args[3:]):
        if s.in_multi:
            s.multi_error = True
        s.local(framing.error(REFUSED.format("COPY ... DB")))
        return
    s.forward(args, spec)


def _refuse_script(s: Session, reason: str) -> None:
    if s.in_multi:
        s.multi_error = True
    s.local(framing.error(SCRIPT_REFUSED.format(reason)))


def _accept_script(s: Session, body: bytes) -> bool:
    """Check a script body (once per distinct body: its SHA1 is remembered when it passes, for EVALSHA
    and the next EVAL of it); refuse it (False) if it does not pass."""
    sha = scripts.sha1(body).encode()
    shas = s.proxy.script_shas
    if sha in shas:
        return True
    reason = scripts.check_script(body)
    if reason is not None:
        _refuse_script(s, reason)
        return False
    if len(shas) >= SCRIPTS_REMEMBERED:   # bounded: clients that make up scripts as they go
        shas.clear()                      # (those forgotten get NOSCRIPT, and are sent again)
    shas.add(sha)
    return True


def _eval(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    """EVAL during a migration: the body is checked (scripts.check_script) and, if it passes, its
    SHA1 is remembered for EVALSHA. EVAL_RO cannot write: not checked."""
    if (s.proxy.migrating and len(args) > 1 and args[0].lower() == b"eval"
            and not _accept_script(s, args[1])):
        return
    s.forward(args, spec)


def _evalsha(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    """EVALSHA during a migration of a script the proxy has not checked: NOSCRIPT, so the client sends
    the body with EVAL (valkey-py's Script, GLIDE do), which is checked."""
    if (s.proxy.migrating and len(args) > 1 and args[0].lower() == b"evalsha"
            and args[1].lower() not in s.proxy.script_shas):
        if s.in_multi:
            s.multi_error = True
        s.local(NOSCRIPT)
        return
    s.forward(args, spec)


def _fcall(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    """FCALL during a migration: only of functions whose library the proxy checked and accepted (at
    FUNCTION LOAD through it, or in FUNCTION LIST WITHCODE at start). FCALL_RO cannot write."""
    if (s.proxy.migrating and len(args) > 1 and args[0].lower() == b"fcall"
            and args[1] not in s.proxy.functions):
        _refuse_script(s, f"function '{args[1].decode(errors='replace')}' is in a library the proxy did "
                          "not check (loaded other than through it during the migration)")
        return
    s.forward(args, spec)


def _script(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    sub = args[1].lower() if len(args) > 1 else b""
    if s.proxy.migrating and sub == b"load" and len(args) == 3:
        if not _accept_script(s, args[2]):
            return
    elif s.proxy.migrating and sub == b"exists" and len(args) > 2:
        # Scripts the proxy has not checked "do not exist": a client then loads them (SCRIPT LOAD,
        # checked) instead of sending an EVALSHA that would get NOSCRIPT (valkey-py's pipelines).
        shas = [a.lower() in s.proxy.script_shas for a in args[2:]]
        s.local_fn(lambda: framing.NOAUTH if not s.authed else
                   b"*%d\r\n" % len(shas) + b"".join(b":1\r\n" if ok else b":0\r\n" for ok in shas))
        return
    s.forward(args, spec)


def _function(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    sub = args[1].lower() if len(args) > 1 else b""
    if s.proxy.migrating and sub == b"load" and len(args) > 2:
        reason, names = scripts.check_library(args[-1])
        if reason is not None:
            _refuse_script(s, reason)
            return
        s.proxy.functions.update(names)
    elif s.proxy.migrating and sub == b"restore":
        _refuse_script(s, "FUNCTION RESTORE loads libraries the proxy cannot check")
        return
    s.forward(args, spec)


def _monitor(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    s.local(framing.error("ERR durablecache: MONITOR is not supported through the proxy"))


def _cluster(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if not s.router.cluster:
        s.forward(args, spec)
        return
    from .cluster import local_cluster_reply
    sub = args[1].lower() if len(args) > 1 else b""

    def answer() -> bytes:
        if not s.authed:
            return framing.NOAUTH
        reply = local_cluster_reply(s.proxy, sub, s.sockname, s.resp3)
        return reply if reply is not None else b""
    if local_cluster_reply(s.proxy, sub, s.sockname, s.resp3) is None:
        s.forward(args, spec)
        return
    s.local_fn(answer)


def _readonly(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if not s.router.cluster:
        s.forward(args, spec)
        return
    s.local_fn(lambda: framing.OK if s.authed else framing.NOAUTH)


def _quit(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    s.local(framing.OK)
    s.collect()
    s.kick()
    s.closed = True

    async def close_later() -> None:
        for _ in range(200):
            if not s.marking and not s.pending:
                break
            await asyncio.sleep(0.05)
        if s.transport is not None:
            s.transport.close()
    asyncio.get_running_loop().create_task(close_later())


SPECIAL: dict[bytes, Callable[[Session, tuple[bytes, ...], CommandSpec | None], None]] = {
    b"auth": _auth, b"hello": _hello, b"client": _client, b"select": _select,
    b"multi": _multi, b"exec": _exec, b"discard": _discard, b"watch": _watch, b"unwatch": _unwatch,
    b"reset": _reset, b"quit": _quit, b"monitor": _monitor, b"cluster": _cluster,
    b"readonly": _readonly, b"readwrite": _readonly, b"copy": _copy,
    **{name: _subscribe for name in SUBSCRIBE_FAMILY},
    **{name: _refuse_if_migrating for name in UNSAFE},
    b"eval": _eval, b"eval_ro": _eval, b"evalsha": _evalsha, b"evalsha_ro": _evalsha,
    b"fcall": _fcall, b"fcall_ro": _fcall, b"script": _script, b"function": _function,
}
