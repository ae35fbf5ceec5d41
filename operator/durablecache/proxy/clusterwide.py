"""Commands that concern more than one upstream node, done for the client as a cluster client would.

- **Fan-out** (cluster mode): a command the server tips ``request_policy:all_shards``/``all_nodes``
  (DBSIZE, KEYS, FLUSHALL, SCRIPT LOAD, FUNCTION LOAD, CONFIG SET, ACL SETUSER, INFO …) goes to every
  primary that owns slots; the replies merge as the tips say (fanout.merge). It keeps its place in the
  client's reply order: the client's reply waits in ``pending`` until every primary answered.
- **SCAN** (cluster mode): one shard at a time, the shard's index and the side in the cursor
  (fanout.scan_cursor); a cursor from before a FLIP starts the walk again on the new side.
- **CLIENT LIST / CLIENT KILL** (both modes): what a client of the proxy sees and may kill
  (clients.py): sessions under their own names, never DurableCache's connections.

Inside MULTI none of this applies: a transaction runs on one node (handlers.py), as on a real cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import clients, fanout, framing
from .commandtable import CommandSpec
from .replies import Entry
from .session import Session

INVALID_CURSOR = b"-ERR invalid cursor\r\n"


def shard_nodes(s: Session) -> list[int]:
    """The router's nodes that own slots (a node a MOVED added but that owns none is left out)."""
    return sorted(set(s.router.owner)) if s.router.cluster else [0]


def gather(s: Session, requests: list[tuple[int, tuple[bytes, ...]]],
           merge: Callable[[list[bytes]], bytes], cb: Any = None) -> None:
    """Send each (node, command) on the session's connection to that node; the client's reply, in its
    place in the reply order, is ``merge`` of their replies (in the order given)."""
    reply = Entry(cb=cb)
    got: list[bytes] = [b""] * len(requests)
    left = [len(requests)]

    def answered(i: int) -> Callable[[Entry], None]:
        def done(e: Entry) -> None:
            got[i] = e.reply or b""
            left[0] -= 1
            if left[0] == 0:
                reply.reply = merge(got)
        return done
    for i, (node, args) in enumerate(requests):
        s.conn(node).internal(args, answered(i))
    # After the requests: a standalone session's replies follow its one connection's order, so the
    # client's reply must come after the replies it is made of (cluster: each node has its own queue).
    s.pending.append(reply)


def fan_out(s: Session, args: tuple[bytes, ...], spec: CommandSpec, cb: Any = None) -> None:
    policy = spec.fanout
    assert policy is not None
    nodes = shard_nodes(s)
    labels = [s.router.nodes[n].address.encode() for n in nodes]
    name = args[0].lower()
    limit = fanout.entry_limit(args)
    gather(s, [(n, args) for n in nodes],
           lambda got: fanout.first_entries(fanout.merge(name, policy, got, labels), limit), cb)


def scan(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    """SCAN through a cluster: shard after shard (standalone: the server's own SCAN)."""
    if not s.router.cluster or s.in_multi or len(args) < 2:
        s.forward(args, spec)
        return
    try:
        value = int(args[1])
    except ValueError:
        s.local_error(INVALID_CURSOR)
        return
    nodes = shard_nodes(s)
    side = s.side & 1     # the FLIP this session's routing belongs to
    shard, cursor, cursor_side = fanout.parse_scan_cursor(value)
    if value and cursor_side != side:
        shard, cursor = 0, 0            # issued before a FLIP: walk the new side from the start
    if value < 0 or shard >= len(nodes):
        s.local_error(INVALID_CURSOR)
        return

    def reply(got: list[bytes]) -> bytes:
        frame = got[0]
        if frame[:1] != b"*":
            return frame
        parts = fanout.elements(frame)
        nxt = fanout.next_scan_cursor(shard, len(nodes), int(fanout.text_of(parts[0])), side)
        return fanout.scan_reply(nxt, parts[1])
    gather(s, [(nodes[shard], (args[0], b"%d" % cursor, *args[2:]))], reply)


# ---- CLIENT LIST / CLIENT KILL ------------------------------------------------------------------
def _client_name(s: Session) -> Callable[[bytes], bytes | None | bool]:
    """An upstream connection's name -> what the proxy's clients see (clients.view)."""
    prefix = s.proxy.name_prefix.encode() + b"-"
    sessions = s.proxy.sessions

    def name(upstream_name: bytes) -> bytes | None | bool:
        if upstream_name.startswith(prefix) and upstream_name[len(prefix):].isdigit():
            other = sessions.get(int(upstream_name[len(prefix):]))
            if other is not None:
                return other.name
        return False
    return name


def client_list(s: Session, args: tuple[bytes, ...]) -> None:
    """CLIENT LIST [TYPE t] [ID …]: the server's list on every primary, as clients.view shows it."""
    if not s.authed:
        s.local_error(framing.NOAUTH)
        return
    nodes = shard_nodes(s)
    named = _client_name(s)

    def merge(got: list[bytes]) -> bytes:
        error = next((g for g in got if fanout.is_error(g)), None)
        if error is not None:
            return error
        once: set[bytes] = set()
        seen = [c for g in got for c in clients.view(fanout.text_of(g), named, once)]
        return fanout.text_like(got[0], clients.render(seen))
    gather(s, [(n, args) for n in nodes], merge)


def client_kill(s: Session, args: tuple[bytes, ...]) -> None:
    """CLIENT KILL: victims chosen among what CLIENT LIST shows the client, killed by ID, node by node.

    Cluster mode only: the kill needs the list first, and a standalone session's replies follow its
    one connection's order, which a second round trip decided by the first cannot join. Standalone,
    a kill of one named connection (ID, ADDR, the old form) goes to the server; a kill by class (TYPE,
    USER, LADDR, MAXAGE) could reach DurableCache's connections and is refused (docs/limits.md)."""
    if not s.authed:
        s.local_error(framing.NOAUTH)
        return
    if not s.router.cluster:
        if len(args) == 3 or all(a.lower() in (b"id", b"addr", b"skipme") for a in args[2::2]):
            s.forward(args, None)
        else:
            s.local_error(framing.error(
                "ERR durablecache: CLIENT KILL by TYPE, USER, LADDR or MAXAGE is refused through the proxy "
                "(it could reach DurableCache's own connections); kill by ID or ADDR, see docs/limits.md"))
        return
    nodes = shard_nodes(s)
    named = _client_name(s)
    reply = Entry()
    s.pending.append(reply)
    lists: dict[int, bytes] = {}

    def listed(node: int) -> Callable[[Entry], None]:
        def done(e: Entry) -> None:
            lists[node] = e.reply or b""
            if len(lists) == len(nodes):
                _kill(s, args[2:], nodes, lists, named, reply)
        return done
    for n in nodes:
        s.conn(n).internal((b"CLIENT", b"LIST"), listed(n))


# Every step below runs in a reply callback: the upstream that read the reply writes what completed.
def _kill(s: Session, filters: tuple[bytes, ...], nodes: list[int], lists: dict[int, bytes],
          named: Callable[[bytes], bytes | None | bool], reply: Entry) -> None:
    error = next((g for g in lists.values() if fanout.is_error(g)), None)
    if error is not None:
        reply.reply = error
        return
    plan: list[tuple[int, bytes]] = []
    old_form = False
    me = {b"%d" % c.client_id for c in s.conns.values() if c.client_id is not None}
    once: set[bytes] = set()
    try:
        for n in nodes:
            victims, old_form = clients.kill_victims(
                filters, clients.view(fanout.text_of(lists[n]), named, once), me)
            plan.extend((n, v) for v in victims)
    except clients.KillError as exc:
        reply.reply = framing.error(str(exc))
        return
    if old_form and not plan:
        reply.reply = framing.error("ERR No such client")
        return
    killed = [0]
    left = [len(plan)]

    def done(e: Entry) -> None:
        killed[0] += 1 if (e.reply or b"").startswith((b":1", b"+OK")) else 0
        left[0] -= 1
        if left[0] == 0:
            reply.reply = framing.OK if old_form else b":%d\r\n" % killed[0]

    if not plan:
        reply.reply = b":0\r\n"
        return
    for n, victim in plan:
        s.conn(n).internal((b"CLIENT", b"KILL", b"ID", victim), done)
    for n in {n for n, _victim in plan}:
        s.conn(n).push_out()    # in a reply callback: nothing else writes the session's queue now

