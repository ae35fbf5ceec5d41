"""The stateful commands the proxy handles itself, or watches on their way: AUTH, HELLO, CLIENT
SETNAME/GETNAME, SELECT, MULTI/EXEC/DISCARD/WATCH/UNWATCH, RESET, the SUBSCRIBE family, CLUSTER and
READONLY/ASKING (cluster mode), MONITOR, QUIT, the commands ElastiCache refuses (noted for the
readiness report, readiness.py) — and the handler table (``SPECIAL``) that sends every such
command, and those of guards.py, to its handler (Session.dispatch, through the proxy's state). Its
names are also what classify.FastMap keeps off the fast path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from . import clusterwide, framing
from .cluster import local_cluster_reply, slot_node
from .commandtable import SUBSCRIBE_FAMILY, CommandSpec
from .framing import frame_end
from .guards import GUARDS
from .readiness import RESTRICTED
from .replies import Entry, hello_id
from .session import Session
from .state import Handler
from .upstream import Upstream


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
            s.auth_proven(args)
            conn.drop_idle = False
            s.sync_next()           # connections prepared for the next side authenticate too
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
            s.facts.resp = proto
        if auth is not None:
            s.authed = True
            s.auth_proven(auth)
            conn.drop_idle = False
            conn.named = True
            conn.client_id = hello_id(r)
        if name is not None:
            s.name = name or None
        s.sync_next()               # connections prepared for the next side follow
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
    if sub == b"list" and not s.in_multi:
        clusterwide.client_list(s, args)
        return
    if sub == b"kill" and len(args) > 2 and not s.in_multi:
        clusterwide.client_kill(s, args)
        return
    if sub == b"setinfo" and len(args) == 4:
        s.facts.setinfo(args[2], args[3])      # the readiness report's library and version
    if sub == b"tracking" and len(args) > 2 and args[2].lower() == b"on":
        s.local(framing.error(TRACKING_REFUSED))
        return
    if sub == b"reply" and len(args) == 3 and args[2].lower() != b"on":
        s.local(framing.error("ERR durablecache: CLIENT REPLY OFF/SKIP is not supported through the proxy"))
        return
    s.forward(args, spec)


# Client-side caching through the proxy could serve stale data: the invalidations of what a client
# cached come from the connection that tracked it, and FLIP (or a reconnect) gives the session another.
TRACKING_REFUSED: Final = ("ERR durablecache: CLIENT TRACKING (client-side caching) is not supported through "
                           "the proxy: invalidations would not survive its switch to another server; turn "
                           "client-side caching off while the application runs through the proxy")


def _select(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    try:
        db = int(args[1]) if len(args) == 2 else -1
    except ValueError:
        db = -1
    if s.in_multi:
        if s.router.cluster:   # it would change one node's db: the session's others would not follow
            s.multi_error = True
            s.local_error(framing.error("ERR durablecache: SELECT inside MULTI is not supported in cluster mode "
                                        "through the proxy; SELECT before MULTI"))
            return
        if db >= 0 and s.multi_abort is None:
            s.multi_marks.append((db, []))
        s.forward(args, spec)
        return
    if db >= 0:
        s.req_db = db
        if s.router.cluster:
            # A cluster with numbered databases (Valkey 9 cluster-databases): every node the session
            # talks to changes db, before anything later is sent on it; connections opened later get
            # the session's db when they open (Routing._replay). A refused SELECT is refused by each.
            for conn in list(s.conns.values()):
                conn.internal((b"SELECT", args[1]))

    def done(e: Entry) -> None:
        if (e.reply or b"").startswith(b"+"):
            s.db = db
            s.facts.selected(db)
            s.sync_next()           # connections prepared for the next side follow
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
        s.count_writes(1)
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
        s.drop_next()               # prepared as the user before RESET: not usable
        s.sync_next()
    s.req_db = 0
    s.req_proto = 2
    s.auth_args = None
    s.iam_proven = None
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


def _monitor(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    s.local(framing.error("ERR durablecache: MONITOR is not supported through the proxy"))


def _cluster(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    s.facts.cluster = True          # a cluster-aware client (the readiness report)
    if not s.router.cluster:
        s.forward(args, spec)
        return
    sub = args[1].lower() if len(args) > 1 else b""

    def answer() -> bytes:
        if not s.authed:
            return framing.NOAUTH
        reply = local_cluster_reply(s.proxy, sub, s.sockname, s.resp3)
        return reply if reply is not None else b""
    if local_cluster_reply(s.proxy, sub, s.sockname, s.resp3) is None:
        s.forward(args, spec, node=slot_node(s.router, sub, args))
        return
    s.local_fn(answer)


def _readonly(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    s.facts.cluster = True
    if not s.router.cluster:
        s.forward(args, spec)
        return
    s.local_fn(lambda: framing.OK if s.authed else framing.NOAUTH)


def _asking(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    s.facts.cluster = True
    s.forward(args, spec)


def _restricted(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    """A command ElastiCache refuses (readiness.RESTRICTED): noted for the readiness report, then
    forwarded as any other."""
    s.facts.used(args[0])
    s.forward(args, spec)


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


SPECIAL: Final[dict[bytes, Handler[Session]]] = {
    b"auth": _auth, b"hello": _hello, b"client": _client, b"select": _select,
    b"multi": _multi, b"exec": _exec, b"discard": _discard, b"watch": _watch, b"unwatch": _unwatch,
    b"reset": _reset, b"quit": _quit, b"monitor": _monitor, b"cluster": _cluster,
    b"readonly": _readonly, b"readwrite": _readonly, b"asking": _asking, b"scan": clusterwide.scan,
    **{name: _restricted for name in RESTRICTED},
    **{name: _subscribe for name in SUBSCRIBE_FAMILY},
    **GUARDS,
}
