"""Which upstream connection a session's request goes to (one standalone server, or the primary of
its keys' slot; a transaction's node; MOVED/ASK followed), and what a new connection is given of the
client's state (AUTH behind a gate, protocol, db, name, subscriptions) — including what happens when
an AUTH the proxy sent for the client is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .. import logs
from ..urls import Endpoint
from .commandtable import CommandSpec
from .iamsessions import LOGINS, iam_user
from .outbox import Outbox
from .prepare import Prepared, State
from .replies import READ, Entry, hello_id
from .router import Router
from .state import ProxyState
from .upstream import Upstream

log = logs.get("durablecache.proxy")


class Routing(Outbox):
    """A session's upstream connections and the client state they replay (session.Session builds on it)."""

    def __init__(self, proxy: ProxyState[Any], sid: int):
        super().__init__(proxy, sid)
        self.name_on_upstream = f"{proxy.name_prefix}-{sid}".encode()
        # client-visible state a new connection replays
        self.req_db = 0                     # db in effect at the request position (replay uses it)
        self.req_proto = 2
        self.authed = not proxy.require_auth
        self.auth_sent = False
        self.auth_pending = 0               # AUTH / HELLO AUTH sent, reply not seen yet
        self.auth_args: tuple[bytes, ...] | None = None
        # The ElastiCache IAM user this session proved to be (a server accepted its AUTH with an IAM
        # token): replays on the other side, or after the token expired, are signed by the proxy
        # (iamsessions.py). None: no such proof, the AUTH is replayed as the client sent it.
        self.iam_proven: bytes | None = None
        self.subs: tuple[set[bytes], set[bytes], set[bytes]] = (set(), set(), set())
        self.in_multi = False
        self.multi_error = False
        self.tx_conn: Upstream | None = None      # cluster: the node a transaction is bound to
        self.multi_sent = False                   # cluster: MULTI was sent on tx_conn
        # Between PREPARE and the switch to the next side: its connections, by node of proxy.next_router
        self.next: dict[int, Prepared] = {}
        self.side = proxy.side              # the FLIP its connections belong to (catch_up: the switch)

    def conn_for(self, args: tuple[bytes, ...], spec: CommandSpec | None, node: int = -1) -> Upstream | None:
        """The connection a command goes to: cluster mode, ``node`` (>= 0: chosen by the caller) or
        the node of its keys, else the first; standalone, the server."""
        router = self.router
        if not router.cluster:
            return self.conn(0)
        if node < 0 and spec is not None:
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

    async def _connect(self, protocol: asyncio.Protocol, endpoint: Endpoint) -> str | None:
        """Connect ``protocol`` to ``endpoint`` (TLS as configured); None, or why it could not."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: protocol, endpoint.host, endpoint.port,
                                       ssl=self.proxy.upstream_ssl(endpoint),
                                       server_hostname=endpoint.tls_hostname if endpoint.tls else None),
                self.proxy.connect_timeout)
        except (TimeoutError, OSError) as exc:
            return str(exc) or type(exc).__name__
        return None

    async def _open(self, conn: Upstream) -> None:
        endpoint = self.router.nodes[conn.node]
        reason = await self._connect(conn, endpoint)
        if reason is not None:
            log.warning("proxy.upstream_unreachable", session=self.id, upstream=endpoint.address, reason=reason)
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
        if auth_args is not None:
            endpoint = self.router.nodes[conn.node]
            login = self.login_for(auth_args, endpoint)
            conn.gate(self.hello_auth(login), self.hello_done(conn))
            if login is not auth_args:      # signed by the proxy: it renews it too
                self._renew_later(conn, endpoint)
        elif self.req_proto == 3:
            conn.internal((b"HELLO", b"3"))
        if self.req_db:            # cluster too: Valkey 9's cluster-databases
            conn.internal((b"SELECT", str(self.req_db).encode()))
        if auth_args is None and (self.authed or self.auth_sent):
            self._name(conn)
        self._replay_subs(conn)

    def _replay_subs(self, conn: Upstream) -> None:
        """Subscriptions cannot be prepared: a new connection (opened or prepared) is given them."""
        for kind, verb in ((0, b"SUBSCRIBE"), (1, b"PSUBSCRIBE")):
            if self.subs[kind] and conn.node == 0:
                conn.internal((verb, *sorted(self.subs[kind])), remaining=len(self.subs[kind]))
        if self.subs[2]:
            for ch in sorted(self.subs[2]):
                if self.router.owner_of(ch) == conn.node:
                    conn.internal((b"SSUBSCRIBE", ch), remaining=1)

    # ---- the next side's connections, prepared before FLIP (prepare.py) -------------------------
    def next_state(self) -> State:
        return (self.auth_args, self.req_proto, self.req_db if not self.router.cluster else 0)

    def prepare_next(self, router: Router) -> int:
        """PREPARE: open this session's connections to the next side now (standalone: its server;
        cluster: every primary, so that no key's first command after FLIP waits for a connect) —
        for an authenticated session; one that authenticates later is prepared then (sync_next).
        Returns how many were opened."""
        if not self.authed or self.auth_pending or self.next or self.client_gone:
            return 0
        want = self.next_state()
        nodes = range(len(router.nodes)) if router.cluster else range(1)
        loop = asyncio.get_running_loop()
        for node in nodes:
            p = Prepared(node, self.name_on_upstream, self._login_to(router.nodes[node]))
            p.sync(want)
            self.next[node] = p
            loop.create_task(self._open_prepared(p, router))
        return len(self.next)

    async def _open_prepared(self, p: Prepared, router: Router) -> None:
        endpoint = router.nodes[p.node]
        async with self.proxy.prepare_gate:
            if p.closed:     # dropped (an aborted attempt, FLIP without it) while it waited
                return
            reason = await self._connect(p, endpoint)
        if reason is not None:
            log.info("proxy.prepare_unreachable", session=self.id, upstream=endpoint.address, reason=reason)
            p.failed = True

    def sync_next(self) -> None:
        """The client's AUTH / HELLO / SELECT / RESET took effect: the prepared connections follow
        (or, for a session authenticated only now, are opened)."""
        router = self.proxy.next_router
        if router is None or self.side != self.proxy.side:
            return
        if not self.next:
            self.prepare_next(router)
            return
        want = self.next_state()
        for p in self.next.values():
            p.sync(want)

    def drop_next(self) -> None:
        """An aborted attempt, or a FLIP elsewhere: what was prepared is closed."""
        for p in self.next.values():
            p.close()
        self.next.clear()

    def adopt_next(self) -> None:
        """At the switch: each prepared connection ready for exactly this session's state becomes its
        Upstream (the transport handed over: no connect, no handshake); the others are closed, and
        the session opens those when it needs them, the ordinary way (conn)."""
        want = self.next_state()
        for node, p in self.next.items():
            if not p.ready_for(want):
                p.close()
                continue
            up = Upstream(self, node)
            up.named = p.named
            up.client_id = p.client_id
            self.conns[node] = up
            self._replay_subs(up)
            transport = p.hand_over()
            transport.set_protocol(up)
            up.connection_made(transport)
            if p.signed:
                self._renew_later(up, self.router.nodes[node])
        self.next.clear()

    def auth_proven(self, auth: tuple[bytes, ...]) -> None:
        """A server accepted the client's ``auth``: whether it proved an IAM user (iamsessions.py)."""
        self.iam_proven = iam_user(auth)

    def login_for(self, auth: tuple[bytes, ...], endpoint: Endpoint) -> tuple[bytes, ...]:
        """The AUTH to replay for the client on a new connection to ``endpoint``."""
        return LOGINS.auth_for(auth, endpoint, self.iam_proven)

    def _renew_later(self, conn: Upstream, endpoint: Endpoint) -> None:
        """AWS closes a connection not authenticated again within 12 hours: one that authenticated with
        a token of ours sends ``AUTH <user> <new token>`` every ``reauth_after``, between two of the
        client's commands (behind an AUTH gate: refused, the client's commands there get the server's
        error). Not inside MULTI (it would be queued), nor on a RESP2 subscribed connection (which
        takes no AUTH): then a second later."""
        iam = endpoint.iam
        if iam is None:
            return
        loop = asyncio.get_running_loop()

        def renew() -> None:
            auth = self.auth_args
            if conn.failed or self.conns.get(conn.node) is not conn or self.client_gone or auth is None:
                return
            if self.in_multi or (conn.subscribed and self.req_proto != 3):
                loop.call_later(1.0, renew)
                return
            login = LOGINS.auth_for(auth, endpoint, self.iam_proven, renew=True)
            if login is auth:        # the session is no longer one we sign for
                return
            conn.gate((b"AUTH", login[1], login[2]))
            loop.call_later(iam.reauth_after, renew)
        loop.call_later(iam.reauth_after, renew)

    def _login_to(self, endpoint: Endpoint) -> Callable[[tuple[bytes, ...]], tuple[bytes, ...]]:
        def login(auth: tuple[bytes, ...]) -> tuple[bytes, ...]:
            return self.login_for(auth, endpoint)
        return login

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
        if not conn.named:
            self._name(conn)

    def _name(self, conn: Upstream) -> None:
        """CLIENT SETNAME with our name, and CLIENT ID for CLIENT UNBLOCK (server.Proxy._unblock)."""
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

