"""The dual-write proxy: listener, upstream topology, FREEZE / FLIP / UNFREEZE, the key hold.

What its sessions share and use of it is state.ProxyState (a Proxy is one); marks delivery is
delivery.MarkDelivery; the command handlers' table is handlers.SPECIAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from .. import logs
from ..errors import ConnectError, RefusedError, ServerError
from ..gcpause import GcHold
from ..resp import Connection, reply_map
from ..topology import discover
from ..urls import Endpoint
from .clusterwide import fan_out
from .commandtable import CommandTable
from .handlers import SPECIAL
from .marks import MarkCallback
from .replies import READ
from .router import Router
from .scripts import check_library
from .session import Session
from .state import ProxyState

log = logs.get("durablecache.proxy")

UNBLOCK_EVERY: Final = 0.1      # re-send CLIENT UNBLOCK while a blocking write is still in flight
FLIP_QUIESCE: Final = 10.0      # bound on waiting for in-flight reads before moving a session
PREPARE_WAIT: Final = 5.0       # bound on waiting at PREPARE for the sessions' connections to be set up
SWITCH_BATCH: Final = 64        # sessions switched per turn of the event loop after a FLIP (~0.3 ms)
# A server's maxclients when CONFIG GET is not allowed (ElastiCache): ElastiCache's fixed limit.
DEFAULT_MAXCLIENTS: Final = 65000
CONNECTION_SHARE: Final = 0.9   # the share of maxclients an attempt may fill, unless a budget is set
GC_HOLD_LIMIT: Final = 10.0   # seconds the collector may stay off for one freeze (see gcpause.py)
PREPARED_FOR: Final = 60.0      # seconds a prepare_flip() discovery may be used by flip() (a topology
                                # change meanwhile is followed by MOVED and the refresh, as at any time)


class Proxy(ProxyState[Session]):
    def __init__(self, upstream: Endpoint, *, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 on_marks: MarkCallback, client_tls: ssl.SSLContext | None = None,
                 require_auth: bool | None = None, migrating: bool = True,
                 name_prefix: str = "durablecache-proxy", connection_budget: int = 0,
                 max_clients: int = 0, announce_host: str | None = None, announce_port: int = 0,
                 reuse_port: bool = False):
        super().__init__(upstream, on_marks=on_marks, special=SPECIAL, require_auth=require_auth,
                         migrating=migrating, name_prefix=name_prefix)
        self.fan_out = fan_out
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.client_tls = client_tls
        self.serves_tls = client_tls is not None
        self.max_clients = max_clients
        self.announce_host = announce_host or None
        self.announce_port = announce_port
        # Several proxy processes on one port (durablecache proxy --processes N): the kernel spreads
        # the connections over their listening sockets.
        self.reuse_port = reuse_port
        self.port = 0
        self._ids = itertools.count(1)
        self._server: asyncio.base_events.Server | None = None
        self._admin: dict[str, Connection] = {}
        self._admin_locks: dict[str, asyncio.Lock] = {}
        self._prepared: tuple[Endpoint, Router, CommandTable, float] | None = None
        self._started = 0.0
        # Connections a cutover attempt may have open on any one server of the side it flips to
        # (its clients', ours and the sessions' prepared ones); 0: CONNECTION_SHARE of its maxclients.
        self.connection_budget = connection_budget
        self._thawed = asyncio.Event()
        self._gc_hold = GcHold()
        self._busy: list[Session] = []        # freeze: the sessions last seen with writes in flight
        self._finishing: asyncio.Task[None] | None = None

    @property
    def on_marks(self) -> MarkCallback:
        return self.delivery.on_marks

    @on_marks.setter
    def on_marks(self, on_marks: MarkCallback) -> None:
        self.delivery.on_marks = on_marks

    # ---- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self.router, table = await self._discover(self.upstream)
        self.use_table(table)
        if self.migrating:
            await self._check_functions(self.router)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_session, self.listen_host, self.listen_port,
                                                ssl=self.client_tls, reuse_address=True,
                                                reuse_port=self.reuse_port or None)
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
            s.drop_next()
        if self._finishing is not None:
            self._finishing.cancel()
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

    # ---- FREEZE / FLIP / UNFREEZE ---------------------------------------------------------------
    def _all_sessions(self) -> list[Session]:
        """Connected sessions and departed ones still waiting for replies to writes / their marks."""
        return [*self.sessions.values(), *self.departed]

    def _inflight(self) -> int:
        """Writes sent and not answered, batches of marks in delivery, and remote marks not
        acknowledged by the syncer yet."""
        return _writes_in_flight(self._writers()) + self._remote_pending()

    def _writers(self) -> list[Session]:
        """The sessions, connected or departed, with writes in flight: ``writing`` (kept as writes are
        sent and settle), less any session the proxy no longer knows (an aborted one whose writes
        can never settle: it is not waited for, and it leaves the set)."""
        sessions, departed = self.sessions, self.departed
        live = [s for s in self.writing
                if (s.inflight or s.marking) and (sessions.get(s.id) is s or s in departed)]
        if len(live) != len(self.writing):
            self.writing.intersection_update(live)
        return live

    def _remote_pending(self) -> int:
        remote = self.delivery.remote
        return remote.pending if remote is not None else 0

    def _frozen_inflight(self) -> int:
        """_inflight() while frozen: no new write is sent then, so only the sessions busy at the last
        look are looked at again; ``_writers()`` confirms before 0 is reported. Neither passes over
        idle sessions: the freeze takes as long with 5,000 idle clients as with 10."""
        busy = [s for s in self._busy if s.inflight or s.marking]
        if not busy:
            busy = self._writers()
        self._busy = busy
        return _writes_in_flight(busy) + self._remote_pending()

    def _send_marks_now(self) -> None:
        """Freeze and hold_keys wait for remote marks' acks: send them now, not on RemoteMarks' timer."""
        remote = self.delivery.remote
        if remote is not None:
            remote.flush()

    async def freeze(self, timeout: float) -> None:
        """Hold new writes; return when every write already sent is answered and its marks delivered."""
        self.frozen = True
        self._thawed.clear()
        self._gc_hold.start(GC_HOLD_LIMIT)
        started = time.monotonic()
        self._busy = self._writers()
        self.settled = asyncio.Event()
        # A blocking write in flight counts as in flight: it is among the busy sessions.
        n = await self._quiesce(self._frozen_inflight, timeout, lambda: self._unblock(True, sessions=self._busy),
                                flush_marks=True, wake=self.settled)
        self._busy = []
        self.settled = None
        if n:
            log.warning("proxy.freeze_timeout", inflight=n, timeout=timeout)
            raise TimeoutError(f"{n} writes still in flight after {timeout:.3f}s")
        log.info("proxy.frozen", ms=round((time.monotonic() - started) * 1000, 2))

    async def _quiesce(self, busy: Callable[[], int], timeout: float, unblock: Callable[[], Awaitable[None]],
                       flush_marks: bool, wake: asyncio.Event | None = None) -> int:
        """Wait until ``busy()`` is 0: freeze, hold_keys and flip wait so for what is in flight. Every
        UNBLOCK_EVERY meanwhile ``unblock()`` (CLIENT UNBLOCK): a blocking command in flight would
        otherwise keep the wait going until its own timeout. With ``flush_marks`` remote marks are sent
        at once each round, not on RemoteMarks' timer: their acks are part of what is awaited.
        With ``wake`` the wait between rounds ends as soon as a write settles (Outbox sets it), not
        only after a tick: streamed marks' acks have no such signal, so the tick stays.
        Returns 0, or how much was still busy when ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        last_unblock = 0.0
        if flush_marks:
            self._send_marks_now()
        while True:
            if wake is not None:
                wake.clear()        # before busy(): a write settling after it sets it again
            n = busy()
            if not n:
                return 0
            now = time.monotonic()
            if now >= deadline:
                return n
            if now - last_unblock >= UNBLOCK_EVERY:
                last_unblock = now
                await unblock()
            if wake is None:
                await asyncio.sleep(0.001)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 0.001)
            if flush_marks:
                self._send_marks_now()

    async def _unblock(self, writes_only: bool, keys: set[bytes] | None = None,
                       sessions: list[Session] | None = None) -> None:
        """CLIENT UNBLOCK (-> the client's timeout reply) for blocking commands in flight; with
        ``keys``, only for blocking writes to one of them."""
        for s in self._all_sessions() if sessions is None else sessions:
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
                if conn is None or not conn.usable:
                    conn = await Connection.open(endpoint, name=f"{self.name_prefix}-admin", select_db=0)
                    self._admin[key] = conn
                return (await conn.pipeline([args], timeout=5.0))[0]
            except ConnectError as exc:
                self._admin.pop(key, None)
                log.warning("proxy.admin_failed", upstream=endpoint.address, reason=str(exc))
                return None

    async def prepare_flip(self, new_upstream: Endpoint) -> None:
        """PREPARE, while writes still flow: discover ``new_upstream`` (topology, COMMAND), check the
        connection budget there, and give every session its connections to it, set up as the
        session's own (prepare.py), so that FLIP itself only switches sides. Sessions opened from now
        on get theirs as they open. Waits (bounded) until they are set up; one that is not by FLIP
        connects the ordinary way after it."""
        self.unprepare()
        router, table = await self._discover(new_upstream)
        await self._check_budget(router, len(self.sessions))
        self._prepared = (new_upstream, router, table, time.monotonic())
        self.next_router = router
        opened = 0
        waiting: list[Session] = []
        # A batch per turn of the event loop: thousands of sessions in one go held every client's
        # commands (and the syncer) for hundreds of milliseconds.
        for i, s in enumerate(list(self.sessions.values())):
            if s.side == self.side and self.next_router is router:
                n = s.prepare_next(router)
                if n:
                    opened += n
                    waiting.append(s)
            if i % SWITCH_BATCH == SWITCH_BATCH - 1:
                await asyncio.sleep(0)
        # Only the sessions not seen ready yet are looked at again: a pass over every session each
        # round took milliseconds with thousands of them.
        deadline = time.monotonic() + PREPARE_WAIT
        while waiting and time.monotonic() < deadline:
            waiting = [s for s in waiting if _unprepared(s)]
            if waiting:
                await asyncio.sleep(0.01)
        log.info("proxy.prepared", upstream=new_upstream.redacted(), connections=opened,
                 sessions_pending=len(waiting))

    def unprepare(self) -> None:
        """An aborted attempt (or a new PREPARE): the prepared connections are closed."""
        self._prepared = None
        if self.next_router is None:
            return
        self.next_router = None
        for s in self.sessions.values():
            s.drop_next()

    async def _check_budget(self, router: Router, sessions: int) -> None:
        """During an attempt each session holds a connection to both sides. Refuse (RefusedError) an
        attempt that would take a server of the new side past the connection budget: the clients it
        has now, plus one prepared connection per session of ours."""
        for endpoint in router.nodes:
            conn = await Connection.open(endpoint, name=f"{self.name_prefix}-admin", select_db=0)
            try:   # not try/finally: see MarkServer._serve (no await in a finally block, compiled)
                try:
                    reply = await conn.call("CONFIG", "GET", "maxclients")
                    maxclients = int(reply_map(reply).get(b"maxclients") or DEFAULT_MAXCLIENTS)
                except ServerError:      # CONFIG not allowed (ElastiCache)
                    maxclients = DEFAULT_MAXCLIENTS
                info = await conn.call("INFO", "clients")
            except BaseException:
                await conn.close()
                raise
            await conn.close()
            connected = _info_int(info, b"connected_clients")
            budget = self.connection_budget or int(maxclients * CONNECTION_SHARE)
            if connected + sessions > budget:
                log.warning("proxy.connection_budget", upstream=endpoint.address, connected=connected,
                            sessions=sessions, budget=budget, maxclients=maxclients)
                raise RefusedError(
                    f"connection budget: {endpoint.address} has {connected} clients and the cutover would "
                    f"add {sessions} (one per client session of this proxy), more than its budget of "
                    f"{budget} (maxclients {maxclients}); raise maxclients or the budget, or reduce clients")

    async def flip(self, new_upstream: Endpoint) -> None:
        """While frozen: the proxy's side becomes ``new_upstream``. Sessions switch to it themselves
        (Session.catch_up) at their next command or, idle ones, right after the pause
        (_finish_flip); that is what keeps the pause from growing with the number of clients."""
        if not self.frozen:
            raise RuntimeError("flip() needs the proxy frozen first")
        started = time.monotonic()
        prepared, self._prepared = self._prepared, None
        use_prepared = (prepared is not None and prepared[0] == new_upstream
                        and started - prepared[3] < PREPARED_FOR)
        if prepared is not None and use_prepared:
            router, table = prepared[1], prepared[2]
        else:
            router, table = await self._discover(new_upstream)
        if not self.frozen:     # unfreeze() while we discovered: writes may be flowing to the old side
            raise RuntimeError("flip() aborted: the proxy was unfrozen meanwhile")
        self.flipping = True
        try:
            # Departed sessions (client gone, writes in flight) leave ``departed`` once their writes
            # are answered and marked; until then they could still write to the old side.
            busy = await self._quiesce(lambda: len(self.departed), FLIP_QUIESCE,
                                       lambda: self._unblock(writes_only=False), flush_marks=False)
            if busy:
                raise TimeoutError(f"{busy} departed sessions still have replies in flight")
            if not self.frozen:
                raise RuntimeError("flip() aborted: the proxy was unfrozen meanwhile")
            await self._close_admin()
            self.upstream = new_upstream
            self.router = router
            self.use_table(table)
            self.side += 1
            self.prepared_side = self.side if use_prepared else -1
            self.next_router = None
        finally:
            self.flipping = False
        if self._finishing is not None:
            self._finishing.cancel()
        self._finishing = asyncio.get_running_loop().create_task(self._finish_flip(self.side))
        log.info("proxy.flipped", upstream=new_upstream.redacted(), sessions=len(self.sessions),
                 prepared=use_prepared, ms=round((time.monotonic() - started) * 1000, 2))

    async def _finish_flip(self, side: int) -> None:
        """After the pause: switch every session that has not switched on its own, a batch per turn
        of the event loop; one with a command in flight on the old side is switched once it has its
        reply (a blocking one is unblocked, as at FREEZE), within FLIP_QUIESCE, or its client is
        disconnected (it reconnects to the new side)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._thawed.wait(), FLIP_QUIESCE)
        deadline = time.monotonic() + FLIP_QUIESCE
        waiting = list(self.sessions.values())
        last_unblock = 0.0
        switched = 0
        while waiting and self.side == side:
            rest = []
            for i, s in enumerate(waiting):
                if s.side == side or s.transport is None:
                    continue
                if s.catch_up():
                    switched += 1
                    if s.held:
                        s.release()
                else:
                    rest.append(s)
                if i % SWITCH_BATCH == SWITCH_BATCH - 1:
                    await asyncio.sleep(0)
            waiting = rest
            if not waiting or self.side != side:
                break
            now = time.monotonic()
            if now >= deadline:
                for s in waiting:
                    if s.side != side:
                        s.abort("could not switch to the new side after FLIP")
                log.warning("proxy.switch_timeout", sessions=len(waiting))
                break
            if now - last_unblock >= UNBLOCK_EVERY:
                last_unblock = now
                await self._unblock(writes_only=False)
            await asyncio.sleep(0.001)
        log.info("proxy.switched", sessions=switched)

    def unfreeze(self) -> None:
        self.frozen = False
        self._thawed.set()
        self._gc_hold.end()
        held, self.held_by_freeze = self.held_by_freeze, []
        for s in held:
            if s.held and self.sessions.get(s.id) is s:
                s.release()   # writes to held keys (hold_keys) are held again at once
        log.info("proxy.unfrozen")

    # ---- key-scoped hold ------------------------------------------------------------------------
    def _inflight_on(self, keys: set[bytes]) -> int:
        """Writes to any of ``keys`` (any db: a conservative match) sent, or answered but whose marks
        are not delivered yet."""
        n = 0
        for s in self._writers():    # a write's entry and its batch of marks count in its session's inflight
            n += sum(1 for e in s.pending if e.marks is not None and _touches(e.marks, keys))
            for batch in (s.batch, s.delivering):
                if batch and any(k in keys for ks in batch.values() for k in ks):
                    n += 1
        remote = self.delivery.remote
        if remote is not None:
            n += remote.touches(keys)
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
        n = await self._quiesce(lambda: self._inflight_on(everything), timeout,
                                lambda: self._unblock(writes_only=True, keys=everything), flush_marks=True)
        if n:
            log.warning("proxy.hold_keys_timeout", inflight=n, keys=len(everything), timeout=timeout)
            raise TimeoutError(f"{n} writes to held keys still in flight after {timeout:.3f}s")
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
        delivery = self.delivery
        return {
            "clients": len(self.sessions),
            "connections_total": self.connections_total,
            "max_clients": self.max_clients,
            "clients_refused": self.clients_refused,
            "commands": self.commands,
            "writes": self.writes,
            "marks": delivery.marks,
            "mark_batches": delivery.mark_batches,
            "marks_failed": delivery.marks_failed,
            "marks_throttled": delivery.marks_throttled,
            "marks_unacknowledged_bytes": delivery.remote.backlog_bytes if delivery.remote is not None else 0,
            "coordinator_lost": delivery.down, "writes_refused": self.writes_refused,   # fail closed (docs/ha.md)
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
            "pid": os.getpid(),
        }


def _info_int(info: Any, field: bytes) -> int:
    """A number from an INFO reply (bytes: ``field:value`` lines)."""
    text = bytes(info or b"")
    for line in text.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name == field:
            return int(value)
    return 0


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


def _unprepared(s: Session) -> bool:
    """Has ``s`` a prepared connection still being connected or set up?"""
    return any(not p.failed and not p.closed and (p.transport is None or p.checks) for p in s.next.values())


def _writes_in_flight(sessions: list[Session]) -> int:
    return sum(s.inflight + (1 if s.marking else 0) for s in sessions)
