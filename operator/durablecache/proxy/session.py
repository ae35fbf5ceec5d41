"""One client connection: its requests parsed and dispatched, on the standalone fast path scanned in
place and forwarded as received (``Session._fast``).

Requests are parsed with libvalkey's reader, re-packed and written to the upstream connection of the
key's node; every request that expects a reply gets an ``Entry`` in the session's ``pending`` queue, in
request order (on the standalone fast path, plain commands are scanned in place, forwarded as received
and share one entry per chunk). Replies are framed (``framing.frame_end``) or counted, matched to the
entries of the connection they came from (upstream.py), and written to the client in request order
(outbox.py). A write's reply is held until its keys were handed over: ``on_marks`` returned
(in-process), or RemoteMarks has them to stream, and then FREEZE waits for the syncer's ack. So by the
cutover, "acknowledged" always implies "marked".

Entries answered by the proxy itself carry a function that computes the reply when the entry reaches
the head of the queue, so local answers (CLIENT GETNAME, CLUSTER SLOTS, NOAUTH ...) see exactly the
state a server would see at that point of the pipeline. The commands the proxy handles itself are in
handlers.py (the stateful ones) and guards.py (those a migration refuses or checks), found through the
proxy's handler table.

The modules of a session, each building on the one before: replies.py (Entry, Replies) ->
upstream.py (Upstream, SessionBase) -> outbox.py (reply order, marks, endings) -> routing.py (which
connection, replayed state, AUTH gates) -> session.py (parsing, fast path, dispatch, holds, FLIP).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import libvalkey
from mypy_extensions import i64

from . import framing
from .classify import FAST_NO, FAST_READ, FastMap
from .commandtable import CommandSpec, keys_from_getkeys
from .framing import command_head, command_tail, name_sig
from .outbox import CLIENT_GONE_GRACE
from .readiness import ClientFacts
from .replies import Entry, Marks, parse_frame
from .routing import Routing
from .state import ProxyState
from .upstream import Upstream

try:
    from ._resp import scan_run
except ImportError:      # built without a C compiler (DURABLECACHE_PURE_PYTHON=1)
    from .framing import scan_run

pack_command: Final = libvalkey.pack_command

STAR: Final = 0x2A
DOLLAR: Final = 0x24


class Session(Routing):
    """One client connection."""

    def __init__(self, proxy: ProxyState[Any], sid: int):
        super().__init__(proxy, sid)
        self.reader = libvalkey.Reader()
        self.held: deque[tuple[bytes, ...]] = deque()
        self.paused = False                 # every new command held (during FLIP)
        self.boundary = True                # the client's stream is at a command boundary
        # The fast path's last command name (framing.name_sig) and its class, kept across chunks: a
        # client mostly sends one command over and over. Valid while the proxy's fastmap is this one.
        self.fast_map: FastMap = proxy.fastmap
        self.fast_sig: i64 = -1
        self.fast_code: Any = None
        self.fast_scalar = False
        # client-visible state (more in Routing: what a new upstream connection replays)
        self.name: bytes | None = None
        self.multi_marks: Marks = []
        self.multi_abort: bytes | None = None     # EXEC's answer when the transaction was broken
        self.watching = False
        self.watch_broken = False
        # Inside MULTI: how many commands were queued, and the proxy's own answers among them (their
        # index in EXEC's array, and the function computing each at EXEC): local_fn, handlers._exec.
        self.multi_count = 0
        self.multi_local: list[tuple[int, Callable[[], bytes]]] = []
        self.sockname: tuple[str, int] = ("127.0.0.1", 0)
        self.facts = ClientFacts("")        # replaced by the registered one when the client connects

    # ---- client side: asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limit = self.proxy.max_clients
        if limit and len(self.proxy.sessions) >= limit:
            # Here, not when the socket is accepted: a TLS client counts once its handshake is done,
            # and gets the refusal over TLS, as from a server.
            self.proxy.refuse_client(transport)
            return
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("sockname")
        if sock:
            self.sockname = (sock[0], sock[1])
        peer = transport.get_extra_info("peername")
        self.facts = self.proxy.readiness.opened(self.id, str(peer[0]) if peer else "")
        self.proxy.sessions[self.id] = self
        # Opened between PREPARE and FLIP: prepared now (authenticated, or no password needed).
        if self.proxy.next_router is not None:
            self.prepare_next(self.proxy.next_router)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.client_gone = True
        self.proxy.sessions.pop(self.id, None)
        self.proxy.readiness.ended(self.id)
        if self.inflight or self.marking:
            # Replies to writes already sent must be seen (and marked) before the upstream goes. Until
            # then the session stays known to the proxy: freeze() waits for it, unblocks it, and flip()
            # does not move the authoritative side while it may still write to the old one.
            self.proxy.departed.add(self)
            asyncio.get_running_loop().call_later(CLIENT_GONE_GRACE, self._give_up)
            self._maybe_finish()
        else:
            self._close_conns()
        self.drop_next()

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

    def data_received(self, data: bytes) -> None:
        proxy = self.proxy
        proxy.bytes_in += len(data)
        reader = self.reader
        # Inline commands start a line of their own, so only at a command boundary: the previous chunk
        # must have ended with a complete command (``self.boundary``, tracked by us). The reader's
        # ``has_data()`` alone cannot tell: it is False after a bare array header and also when exactly
        # one unread byte ('*', '$') is buffered, and treating the rest of such a command as inline
        # lines would execute bytes of a value as commands.
        if self.side != proxy.side:
            self.catch_up()
        if self.boundary and data[0] != STAR and data[0] != DOLLAR and not reader.has_data():
            data = self._inline(data)
            if not data:
                self._push_all()
                return
        if (not self.router.cluster and not proxy.frozen and not self.held and not self.paused
                and not proxy.delivery.down
                and self.side == proxy.side
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
        fm = proxy.fastmap
        fastmap = fm.codes
        scalar = fm.scalar
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
        if self.fast_map is not fm:           # the proxy flipped: names are classified anew
            self.fast_map = fm
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
                        code = fm.classify(name)
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
                code = fm.classify(args[0])
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
        self.count_writes(writes)
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

    # ---- requests -------------------------------------------------------------------------------
    def handle(self, args: tuple[bytes, ...]) -> None:
        """One request, in order: hold it (FREEZE/FLIP) or dispatch it now."""
        proxy = self.proxy
        proxy.commands += 1
        if self.held or self.paused or (self.side != proxy.side and not self.catch_up()):
            self.held.append(args)
            return
        spec = proxy.table.lookup(args)
        if proxy.delivery.down and self._is_write(args, spec):
            self._refuse_orphan()
            return
        if proxy.frozen and self._is_write(args, spec):
            proxy.held_total += 1
            proxy.held_by_freeze.append(self)   # UNFREEZE releases these, not every session
            self.held.append(args)
            return
        if proxy.key_hold and self._writes_held_key(args, spec):
            proxy.key_held_total += 1
            self.held.append(args)
            return
        self.dispatch(args, spec)

    def _refuse_orphan(self) -> None:
        """Fail closed (docs/ha.md): the stream to the coordinator is down, so the marks of a write
        could not be delivered; refuse it before anything is sent. Inside MULTI the transaction's
        state upstream is unknown to the client after a refused command: the connection is closed."""
        self.proxy.writes_refused += 1
        if self.in_multi:
            if self.transport is not None:
                self.transport.write(ORPHAN_ERROR)
                self.transport.close()
            return
        self.local_fn(_orphan_error)

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
        special = self.proxy.special.get(name)
        if special is not None:
            special(self, args, spec)
            return
        self.forward(args, spec)

    def forward(self, args: tuple[bytes, ...], spec: CommandSpec | None, cb: Any = None, node: int = -1) -> None:
        """Send a client's command upstream: to ``node`` (cluster: an index into the router's
        primaries) when the caller chose one, else where its keys are (conn_for)."""
        if not self.authed and not self.auth_sent:
            self.local_error(framing.NOAUTH)
            return
        if self.multi_abort is not None:
            self.local(framing.QUEUED)
            return
        if spec is not None and spec.fanout is not None and self.router.cluster and not self.in_multi:
            fan_out = self.proxy.fan_out
            if fan_out is not None:
                fan_out(self, args, spec, cb)
                return
        conn = self.conn_for(args, spec, node)
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
            self.count_writes(1)
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

    def local_fn(self, fn: Callable[[], bytes]) -> None:
        """A reply the proxy computes when it is due. Inside MULTI it is a queued command: +QUEUED
        now, and its reply is computed at EXEC, in its place in EXEC's array (handlers._exec)."""
        if self.in_multi:
            if self.multi_abort is None:
                self.multi_local.append((self.multi_count, fn))
                self.multi_count += 1
            self.local(framing.QUEUED)
            return
        e = Entry()
        e.fn = fn
        self.pending.append(e)

    def catch_up(self) -> bool:
        """Switch to the side the proxy flipped to, if nothing of this session is in flight (replies
        are matched to its queue in order, so an old connection's must all be in); False if not yet
        (its commands are held meanwhile, and server.Proxy._finish_flip switches it once quiet).
        Prepared connections are taken over as they are (adopt_next); what cannot be prepared is
        done here: subscriptions renewed, an open MULTI aborted, an open WATCH broken."""
        proxy = self.proxy
        if not self.quiet():
            return False
        self.side = proxy.side
        for c in self.conns.values():
            c.close()
        self.conns.clear()
        self.router = proxy.router
        self.tx_conn = None
        self.multi_sent = False
        self.req_db = self.db
        if self.in_multi:
            self.multi_abort = framing.null_array(self.resp3)
        if self.watching:
            self.watch_broken = True
        if self.next and proxy.next_router is None and proxy.prepared_side == self.side:
            self.adopt_next()
        else:
            self.drop_next()
        if any(self.subs):
            self.conn(0)    # re-subscribe now, not on the next command
            for ch in self.subs[2]:
                self.conn(self.router.owner_of(ch))
        return True


ORPHAN_ERROR: Final = (b"-TRYAGAIN durablecache: this proxy lost its coordinator and refuses writes until it "
                       b"is back (nothing was written)\r\n")


def _orphan_error() -> bytes:
    return ORPHAN_ERROR
