"""The dual-write proxy: listener, upstream topology, FREEZE / FLIP / UNFREEZE, marks delivery."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import itertools
import secrets
import ssl
import time
from collections.abc import Coroutine, Generator
from typing import Any, Final

from valkey.crc import key_slot

from .. import logs
from ..errors import ConnectError, ServerError
from ..resp import Connection, reply_map, tls_context
from ..topology import SLOTS, Topology, discover
from ..urls import Endpoint
from .commandtable import CommandTable
from .marks import MarkCallback, RemoteMarks
from .scripts import check_library
from .session import FAST_NO, FAST_READ, READ, SCALAR_REPLY, SCRIPTING, SPECIAL, Session


def is_async(fn: Any) -> bool:
    """Is ``fn`` (a function, a bound method or an object with ``__call__``) a coroutine function?"""
    if inspect.iscoroutinefunction(fn):
        return True
    return not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)


log = logs.get("durablecache.proxy")

UNBLOCK_EVERY: Final = 0.1      # re-send CLIENT UNBLOCK while a blocking write is still in flight
FASTMAP_SPELLINGS: Final = 4096  # command names (as clients spell them) whose fast-path class is remembered
EAGER_RETRY: Final = 1000       # after on_marks suspended, queue this many submissions before trying "now" again
FLIP_QUIESCE: Final = 10.0      # bound on waiting for in-flight reads before moving a session
PREPARED_FOR: Final = 60.0      # seconds a prepare_flip() discovery may be used by flip() (a topology
                                # change meanwhile is followed by MOVED and the refresh, as at any time)
# Remote marks not acknowledged yet, in frame bytes, below which writes are answered without waiting
# for the syncer's ack: bounds the proxy's memory (and the marks a crash could lose) in a syncer outage.
MARK_STREAM_BYTES: Final = 8 << 20


@dataclasses.dataclass
class Router:
    """Where a session's commands go: one standalone server, or the primaries of a cluster by slot."""

    cluster: bool
    nodes: list[Endpoint]
    owner: list[int]          # slot -> index into nodes (cluster only)

    def slot_of(self, keys: list[bytes]) -> int:
        """The common slot of ``keys``; -1 when they span slots (CROSSSLOT)."""
        slot = key_slot(keys[0])
        for k in keys[1:]:
            if key_slot(k) != slot:
                return -1
        return slot

    def owner_of(self, key: bytes) -> int:
        return self.owner[key_slot(key)] if self.cluster else 0

    @classmethod
    def from_topology(cls, topo: Topology) -> Router:
        if not topo.cluster:
            return cls(False, [topo.seed], [])
        return cls(True, list(topo.primaries), list(topo.slot_owner))


class _Resume:
    """Awaitable that finishes a coroutine already advanced by hand to its first suspension: the
    future it yielded is passed on to the awaiting task, and what the task sends or throws back is
    passed into the coroutine, exactly as if the task had started it."""

    def __init__(self, coro: Coroutine[Any, Any, bool], first: Any):
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, bool]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # noqa: BLE001 — cancellation and the like go into the coroutine
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return bool(stop.value)
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return bool(stop.value)


class Proxy:
    def __init__(self, upstream: Endpoint, *, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 on_marks: MarkCallback, client_tls: ssl.SSLContext | None = None,
                 require_auth: bool | None = None, migrating: bool = True,
                 name_prefix: str = "durablecache-proxy"):
        self.upstream = upstream
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.on_marks = on_marks
        self.client_tls = client_tls
        self.require_auth = upstream.password is not None if require_auth is None else require_auth
        self.migrating = migrating
        self.name_prefix = name_prefix
        self.node_id = secrets.token_hex(20)
        self.shard_id = secrets.token_hex(20)
        self.connect_timeout = 5.0
        self.port = 0
        self.router = Router(False, [upstream], [])
        self.table: CommandTable
        self.sessions: dict[int, Session] = {}
        # Sessions whose client left while writes were in flight: still awaiting replies/marks.
        self.departed: set[Session] = set()
        self.frozen = False
        self.flipping = False
        # Key-scoped hold (hold_keys): db -> keys whose writes are held; empty when none is.
        self.key_hold: dict[int, set[bytes]] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.base_events.Server | None = None
        self._admin: dict[str, Connection] = {}
        self._admin_locks: dict[str, asyncio.Lock] = {}
        self._ssl: dict[Endpoint, ssl.SSLContext | None] = {}
        self._prepared: tuple[Endpoint, Router, CommandTable, float] | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._mark_queue: list[tuple[Session, dict[int, list[bytes]], int, list[bytes]]] = []
        self._delivering = False
        self._eager_skip = 0
        self._rounds: set[asyncio.Task[None]] = set()
        self.fastmap: dict[bytes, Any] = {}
        self.scalar_names: set[bytes] = set()   # SCALAR_REPLY as the clients spell the names
        self._started = 0.0
        self.mark_stream_bytes = MARK_STREAM_BYTES
        # During a migration (session.SCRIPTING): the SHA1s of the script bodies the proxy checked and
        # accepted (EVALSHA of any other gets NOSCRIPT), and the functions whose library it accepted
        # (FCALL of any other is refused). Shared by every session.
        self.script_shas: set[bytes] = set()
        self.functions: set[bytes] = set()
        # stats
        self.commands = 0
        self.writes = 0
        self.marks = 0
        self.mark_batches = 0
        self.marks_failed = 0
        self.marks_throttled = 0        # batches whose replies waited for the syncer's ack (backlog full)
        self.held_total = 0
        self.key_held_total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.bytes_up = 0
        self.reply_chunks = 0
        self.reply_chunks_counted = 0   # taken whole by the counted reply path (Upstream._count)
        self.connections_total = 0

    @property
    def on_marks(self) -> MarkCallback:
        return self._on_marks

    @on_marks.setter
    def on_marks(self, on_marks: MarkCallback) -> None:
        self._on_marks = on_marks
        self._marks_sync = not is_async(on_marks)
        # RemoteMarks takes each batch through submit(): streamed, or calling back on its ack.
        self._remote = on_marks if isinstance(on_marks, RemoteMarks) else None

    # ---- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self.router, self.table = await self._discover(self.upstream)
        if self.migrating:
            await self._check_functions(self.router)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_session, self.listen_host, self.listen_port,
                                                ssl=self.client_tls, reuse_address=True)
        # Any: uvloop's server keeps its sockets in a list, the standard loop's (as typed) in a tuple,
        # and the compiled module would check the declared type.
        server: Any = self._server
        self.port = int(server.sockets[0].getsockname()[1])
        self._started = time.monotonic()
        log.info("proxy.started", listen=f"{self.listen_host}:{self.port}", upstream=self.upstream.redacted(),
                 mode="cluster" if self.router.cluster else "standalone", nodes=len(self.router.nodes),
                 commands=len(self.table))

    async def _check_functions(self, router: Router) -> None:
        """The function libraries already loaded upstream (FUNCTION LIST WITHCODE on each primary) are
        checked like a FUNCTION LOAD during a migration (scripts.check_library): FCALL of a function
        is allowed only if its library passed. Servers without functions (Redis 6) have none."""
        for endpoint in router.nodes:
            conn = await Connection.open(endpoint, name=f"{self.name_prefix}-admin", select_db=0)
            try:   # not try/finally: see MarkServer._serve (no await in a finally block, compiled)
                reply = await conn.call("FUNCTION", "LIST", "WITHCODE")
            except ServerError as exc:   # no functions (Redis 6), or not allowed: FCALL is then refused
                log.info("proxy.function_list_unavailable", node=endpoint.address, reason=str(exc))
                reply = []
            except BaseException:
                await conn.close()
                raise
            await conn.close()
            for lib in reply or []:
                fields = reply_map(lib)
                reason, _ = check_library(bytes(fields.get(b"library_code") or b""))
                names = [reply_map(f).get(b"name") for f in fields.get(b"functions") or []]
                if reason is None:
                    self.functions.update(n for n in names if isinstance(n, bytes))
                else:
                    log.info("proxy.function_library_refused", node=endpoint.address,
                             library=bytes(fields.get(b"library_name") or b"").decode(errors="replace"),
                             reason=reason)

    def _new_session(self) -> Session:
        self.connections_total += 1
        return Session(self, next(self._ids))

    async def _discover(self, upstream: Endpoint) -> tuple[Router, CommandTable]:
        """Topology and command table of an upstream, through our own (named) admin connection."""
        name = f"{self.name_prefix}-admin"
        topo = await discover(upstream, name=name)
        conn = await Connection.open(upstream, name=name, select_db=0)
        try:   # not try/finally: see MarkServer._serve (no await in a finally block, compiled)
            reply = await conn.call("COMMAND")
        except BaseException:
            await conn.close()
            raise
        await conn.close()
        return Router.from_topology(topo), CommandTable(reply, topo.version)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for s in [*self.sessions.values(), *self.departed]:
            if s.transport is not None:
                s.transport.close()
            s._close_conns()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        await self._close_admin()
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectError, ServerError):
                await self._refresh  # not left half-done for a closing event loop

    async def _close_admin(self) -> None:
        conns, self._admin = self._admin, {}
        for c in conns.values():
            await c.close()

    # ---- used by sessions ---------------------------------------------------------------------
    def upstream_ssl(self, endpoint: Endpoint) -> ssl.SSLContext | None:
        if endpoint not in self._ssl:
            self._ssl[endpoint] = tls_context(endpoint)
        return self._ssl[endpoint]

    def marks_now(self, batch: dict[int, list[bytes]], writes: int) -> bool | None:
        """Hand marks over without waiting, where that settles them: True once a synchronous
        ``on_marks`` took them or RemoteMarks streams them, False if that failed; None when they
        need a delivery that completes later (``submit_marks``).

        RemoteMarks streams while its unacknowledged backlog is below ``mark_stream_bytes`` (freeze
        and hold_keys wait for that backlog: docs/proxy.md, "Marks"); past it, the replies wait for
        the syncer's ack, which slows the writers down to the syncer's pace."""
        if self._marks_sync:
            return self._deliver_now(batch, writes)
        remote = self._remote
        if remote is not None and remote.backlog_bytes < self.mark_stream_bytes:
            for keys in batch.values():
                self.marks += len(keys)
            self.mark_batches += 1
            remote.submit(batch)
            return True
        return None

    def submit_marks(self, session: Session, batch: dict[int, list[bytes]], writes: int,
                     out: list[bytes]) -> None:
        """Deliver marks that ``marks_now`` could not settle, then let the session write the replies
        (``session.marks_done``).

        RemoteMarks with a full backlog calls back on the syncer's ack. A coroutine function is
        driven by hand first, and when it completes without suspending the replies go out in this
        very callback — no task, no extra loop iteration. If it suspends, the started delivery is
        finished in a task, and the next ``EAGER_RETRY`` submissions are queued instead: everything
        queued in one loop iteration is delivered as one round (one ``on_marks`` call per db); rounds
        do not wait for each other, so a slow syncer does not serialise the sessions."""
        remote = self._remote
        if remote is not None:
            keys = 0
            for ks in batch.values():
                keys += len(ks)
            self.marks_throttled += 1
            remote.submit(batch, functools.partial(self._acked, session, writes, out, keys))
            return
        if not self._eager_skip:
            coro = self.deliver(batch, writes)
            try:
                first = coro.send(None)
            except StopIteration as stop:
                session.marks_done(stop.value, writes, out)
                return
            self._eager_skip = EAGER_RETRY
            task = asyncio.get_running_loop().create_task(self._finish_eager(coro, first, session, writes, out))
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)
            return
        self._eager_skip -= 1
        self._mark_queue.append((session, batch, writes, out))
        if not self._delivering:
            self._delivering = True
            asyncio.get_running_loop().call_soon(self._start_round)

    def _start_round(self) -> None:
        self._delivering = False
        queue, self._mark_queue = self._mark_queue, []
        if queue:
            task = asyncio.get_running_loop().create_task(self._deliver_round(queue))
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)

    async def _finish_eager(self, coro: Coroutine[Any, Any, bool], first: Any, session: Session, writes: int,
                            out: list[bytes]) -> None:
        ok = await _Resume(coro, first)
        session.marks_done(ok, writes, out)

    async def _deliver_round(self, queue: list[tuple[Session, dict[int, list[bytes]], int, list[bytes]]]) -> None:
        if len(queue) == 1:
            merged = queue[0][1]
        else:
            merged = {}
            for _, batch, _, _ in queue:
                for db, keys in batch.items():
                    if db in merged:
                        merged[db].extend(keys)
                    else:
                        merged[db] = list(keys)
        ok = await self.deliver(merged, sum(q[2] for q in queue))
        for session, _, writes, out in queue:
            session.marks_done(ok, writes, out)

    def classify(self, name: bytes) -> Any:
        """Fast-path class of a command name as the client spelled it: FAST_READ, FAST_NO (the general
        path: special handling, subcommands, unknown), an int for a plain write whose one key is
        always at that index (SET, INCR …), or the CommandSpec of another plain write."""
        code = self.fastmap.get(name)
        if code is None:
            spec = self.table.specs.get(name.lower())
            low = name.lower()
            if (spec is None or spec.subcommands or spec.pubsub
                    or (low in SPECIAL and (self.migrating or low not in SCRIPTING))):
                code = FAST_NO
            elif spec.blocking and not spec.hold:
                # XREAD BLOCK, WAIT, WAITAOF: an entry of their own (general path), never inside a
                # run with writes, whose replies (and freeze) would wait for them.
                code = FAST_NO
            elif not spec.hold:
                code = FAST_READ
            elif spec.needs_getkeys:
                code = FAST_NO
            elif spec.key_index > 0 and not spec.blocking:
                code = spec.key_index
            else:
                code = spec
            if len(self.fastmap) < FASTMAP_SPELLINGS:   # bounded: a client could spell names endlessly
                self.fastmap[name] = code
                if low in SCALAR_REPLY:
                    self.scalar_names.add(name)
        return code

    async def deliver(self, batch: dict[int, list[bytes]], writes: int) -> bool:
        """Hand the keys of completed writes to ``on_marks``; False if that failed (never drop quietly)."""
        try:
            for db, keys in batch.items():
                await self._on_marks(db, keys)   # type: ignore[misc]  # async: checked when it was set
                self.marks += len(keys)
            self.mark_batches += 1
            return True
        except Exception as exc:  # noqa: BLE001 — any failure means the marks are not delivered
            return self._marks_failed(exc, writes)

    def _acked(self, session: Session, writes: int, out: list[bytes], keys: int, failed: BaseException | None) -> None:
        if failed is None:
            self.marks += keys
            self.mark_batches += 1
        else:
            self._marks_failed(failed, writes)
        session.marks_done(failed is None, writes, out)

    def _deliver_now(self, batch: dict[int, list[bytes]], writes: int) -> bool:
        """``deliver`` for a synchronous ``on_marks``."""
        try:
            for db, keys in batch.items():
                if self._on_marks(db, keys) is not None:
                    raise TypeError("a synchronous on_marks must return None (or be a coroutine function)")
                self.marks += len(keys)
            self.mark_batches += 1
            return True
        except Exception as exc:  # noqa: BLE001 — any failure means the marks are not delivered
            return self._marks_failed(exc, writes)

    def _marks_failed(self, exc: BaseException, writes: int) -> bool:
        self.marks_failed += 1
        log.error("proxy.marks_failed", reason=str(exc) or type(exc).__name__, writes=writes)
        return False

    def node_index(self, host: str, port: int) -> int:
        for i, node in enumerate(self.router.nodes):
            if node.host == host and node.port == port:
                return i
        self.router.nodes.append(self.router.nodes[0].with_address(host, port))
        return len(self.router.nodes) - 1

    def refresh_topology(self) -> None:
        """After a MOVED: reload the slot map (one refresh at a time)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._do_refresh())

    async def _do_refresh(self) -> None:
        try:
            topo = await discover(self.router.nodes[0], name=f"{self.name_prefix}-admin")
        except (ConnectError, ServerError) as exc:
            log.warning("proxy.topology_refresh_failed", reason=str(exc))
            return
        if not topo.cluster:
            return
        router = self.router
        owner = [0] * SLOTS
        for slot, idx in enumerate(topo.slot_owner):
            node = topo.primaries[idx]
            owner[slot] = self.node_index(node.host, node.port)
        router.owner[:] = owner

    # ---- FREEZE / FLIP / UNFREEZE ---------------------------------------------------------------
    def _all_sessions(self) -> list[Session]:
        """Connected sessions and departed ones still waiting for replies to writes / their marks."""
        return [*self.sessions.values(), *self.departed]

    def _inflight(self) -> int:
        """Writes sent and not answered, batches of marks in delivery, and remote marks not
        acknowledged by the syncer yet."""
        n = sum(s.inflight + (1 if s.marking else 0) for s in self._all_sessions())
        if self._remote is not None:
            n += self._remote.pending
        return n

    def _send_marks_now(self) -> None:
        """Freeze and hold_keys wait for remote marks' acks: send them now, not on RemoteMarks' timer."""
        if self._remote is not None:
            self._remote.flush()

    async def freeze(self, timeout: float) -> None:
        """Hold new writes; return when every write already sent is answered and its marks delivered."""
        self.frozen = True
        started = time.monotonic()
        deadline = started + timeout
        last_unblock = 0.0
        self._send_marks_now()
        while self._inflight():
            now = time.monotonic()
            if now >= deadline:
                log.warning("proxy.freeze_timeout", inflight=self._inflight(), timeout=timeout)
                raise TimeoutError(f"{self._inflight()} writes still in flight after {timeout:.3f}s")
            if now - last_unblock >= UNBLOCK_EVERY:
                last_unblock = now
                await self._unblock(writes_only=True)
            await asyncio.sleep(0.001)
            self._send_marks_now()
        log.info("proxy.frozen", ms=round((time.monotonic() - started) * 1000, 2))

    async def _unblock(self, writes_only: bool, keys: set[bytes] | None = None) -> None:
        """CLIENT UNBLOCK (-> the client's timeout reply) for blocking commands in flight; with
        ``keys``, only for blocking writes to one of them."""
        for s in self._all_sessions():
            for conn in list(s.conns.values()):
                if conn.client_id is None:
                    continue
                queue = conn.expect if s.router.cluster else s.pending
                if keys is not None:
                    if any(e.blocking and _touches(e.marks, keys) for e in queue):
                        await self._admin_call(conn.node, s.router, "CLIENT", "UNBLOCK", conn.client_id, "TIMEOUT")
                    continue
                if _must_unblock(queue, writes_only):
                    await self._admin_call(conn.node, s.router, "CLIENT", "UNBLOCK", conn.client_id, "TIMEOUT")

    async def _admin_call(self, node: int, router: Router, *args: Any) -> Any:
        endpoint = router.nodes[node]
        key = endpoint.address
        # A Connection serves one task at a time: freeze, flip and hold_keys may unblock concurrently.
        lock = self._admin_locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._admin.get(key)
            try:
                if conn is None or conn.broken:
                    conn = await Connection.open(endpoint, name=f"{self.name_prefix}-admin", select_db=0)
                    self._admin[key] = conn
                return (await conn.pipeline([args], timeout=5.0))[0]
            except ConnectError as exc:
                self._admin.pop(key, None)
                log.warning("proxy.admin_failed", upstream=endpoint.address, reason=str(exc))
                return None

    async def prepare_flip(self, new_upstream: Endpoint) -> None:
        """Discover ``new_upstream`` (topology, COMMAND) before the freeze, for the next flip() to it:
        that discovery was most of a flip's time, which is all write-paused time."""
        router, table = await self._discover(new_upstream)
        self._prepared = (new_upstream, router, table, time.monotonic())

    async def flip(self, new_upstream: Endpoint) -> None:
        """While frozen: move every session to ``new_upstream`` with its state (see docs/proxy.md)."""
        if not self.frozen:
            raise RuntimeError("flip() needs the proxy frozen first")
        started = time.monotonic()
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == new_upstream and started - prepared[3] < PREPARED_FOR:
            router, table = prepared[1], prepared[2]
        else:
            router, table = await self._discover(new_upstream)
        if not self.frozen:     # unfreeze() while we discovered: writes may be flowing to the old side
            raise RuntimeError("flip() aborted: the proxy was unfrozen meanwhile")
        self.flipping = True
        try:
            for s in self.sessions.values():
                s.paused = True
            deadline = time.monotonic() + FLIP_QUIESCE
            last_unblock = 0.0
            # Departed sessions (client gone, writes in flight) leave ``departed`` once their writes
            # are answered and marked; until then they could still write to the old side.
            while any(not s.quiet() for s in self.sessions.values()) or self.departed:
                now = time.monotonic()
                if now >= deadline:
                    busy = sum(1 for s in self.sessions.values() if not s.quiet()) + len(self.departed)
                    raise TimeoutError(f"{busy} sessions still have replies in flight")
                if now - last_unblock >= UNBLOCK_EVERY:
                    last_unblock = now
                    await self._unblock(writes_only=False)
                await asyncio.sleep(0.001)
            if not self.frozen:
                raise RuntimeError("flip() aborted: the proxy was unfrozen meanwhile")
            await self._close_admin()
            self.upstream = new_upstream
            self.router = router
            self.table = table
            self.fastmap = {}
            for s in list(self.sessions.values()):
                s.reattach(router)
        finally:
            self.flipping = False
            for s in list(self.sessions.values()):
                s.paused = False
                s.release()
        log.info("proxy.flipped", upstream=new_upstream.redacted(), sessions=len(self.sessions),
                 ms=round((time.monotonic() - started) * 1000, 2))

    def unfreeze(self) -> None:
        self.frozen = False
        for s in list(self.sessions.values()):
            s.release()       # writes to held keys (hold_keys) are held again at once
        log.info("proxy.unfrozen")

    # ---- key-scoped hold ------------------------------------------------------------------------
    def holds(self, db: int, keys: list[bytes]) -> bool:
        """Does a write of ``keys`` in ``db`` touch a held key?"""
        held = self.key_hold.get(db)
        return held is not None and any(k in held for k in keys)

    def _inflight_on(self, keys: set[bytes]) -> int:
        """Writes to any of ``keys`` (any db: a conservative match) sent, or answered but whose marks
        are not delivered yet."""
        n = 0
        for s in self._all_sessions():
            n += sum(1 for e in s.pending if e.marks is not None and _touches(e.marks, keys))
            for batch in (s.batch, s.delivering):
                if batch and any(k in keys for ks in batch.values() for k in ks):
                    n += 1
        if self._remote is not None:
            n += self._remote.touches(keys)
        return n

    async def hold_keys(self, keys: set[tuple[int, bytes]], timeout: float) -> None:
        """From now on hold every write that touches one of ``keys`` ((db, key) pairs; cluster: db 0):
        the client's later commands on that connection wait behind it, in order; reads and other keys
        go on. Return when every write to them already sent is answered and its marks delivered;
        TimeoutError otherwise (the keys stay held: the caller releases). Adds to keys held already."""
        for db, key in keys:
            self.key_hold.setdefault(db, set()).add(key)
        everything = {k for ks in self.key_hold.values() for k in ks}
        started = time.monotonic()
        deadline = started + timeout
        last_unblock = 0.0
        self._send_marks_now()
        while self._inflight_on(everything):
            now = time.monotonic()
            if now >= deadline:
                n = self._inflight_on(everything)
                log.warning("proxy.hold_keys_timeout", inflight=n, keys=len(everything), timeout=timeout)
                raise TimeoutError(f"{n} writes to held keys still in flight after {timeout:.3f}s")
            if now - last_unblock >= UNBLOCK_EVERY:
                last_unblock = now
                await self._unblock(writes_only=True, keys=everything)
            await asyncio.sleep(0.001)
            self._send_marks_now()
        log.info("proxy.keys_held", keys=len(everything), ms=round((time.monotonic() - started) * 1000, 2))

    def release_keys(self) -> None:
        """End the key hold: held writes go on, in order, to whichever upstream is authoritative now
        (still held while the proxy is frozen or flipping)."""
        if not self.key_hold:
            return
        self.key_hold = {}
        for s in list(self.sessions.values()):
            if s.held:
                s.release()
        log.info("proxy.keys_released")

    def stats(self) -> dict[str, Any]:
        return {
            "clients": len(self.sessions),
            "connections_total": self.connections_total,
            "commands": self.commands,
            "writes": self.writes,
            "marks": self.marks,
            "mark_batches": self.mark_batches,
            "marks_failed": self.marks_failed,
            "marks_throttled": self.marks_throttled,
            "marks_unacknowledged_bytes": self._remote.backlog_bytes if self._remote is not None else 0,
            "held": sum(len(s.held) for s in self.sessions.values()),
            "held_total": self.held_total,
            "held_keys": sum(len(k) for k in self.key_hold.values()),
            "key_held_total": self.key_held_total,
            "inflight_writes": self._inflight(),
            "frozen": self.frozen,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "bytes_upstream": self.bytes_up,
            "reply_chunks": self.reply_chunks,
            "reply_chunks_counted": self.reply_chunks_counted,
            "upstream": self.upstream.redacted(),
            "mode": "cluster" if self.router.cluster else "standalone",
            "uptime": round(time.monotonic() - self._started, 3) if self._started else 0.0,
        }


def _touches(marks: Any, keys: set[bytes]) -> bool:
    """Do an entry's marks ([(db | None, keys)]) name one of ``keys``?"""
    return bool(marks) and any(k in keys for _, ks in marks for k in ks)


def _must_unblock(queue: Any, writes_only: bool) -> bool:
    """Should a connection with these entries in flight be unblocked? ``writes_only`` (freeze): when a
    blocking write is in flight, or a blocking read (XREAD BLOCK, WAIT) with writes queued behind it —
    they cannot be answered before it. Otherwise (flip): when anything of the client is in flight."""
    blocked = False
    for e in queue:
        if e.blocking:
            if e.marks is not None or not writes_only:
                return True
            blocked = True
        elif (blocked and e.marks is not None) or (
                not writes_only and (e is READ or (e.conn is not None and not e.internal))):
            return True
    return False
