"""What a proxy's sessions share and use of it: settings, the upstream's routing, the switches FREEZE,
FLIP and the key hold set, the handler table and the fast path's classes, marks delivery, counters.

``Proxy`` (server.py) is a ``ProxyState`` and drives it; the session modules import only this
module, so nothing below the server imports it (no import loop). A native base class rather than a
typing.Protocol: compiled, every read of it on the per-command path stays a native attribute access.
Generic in the session type, so the registry of sessions is typed for the server without this module
naming the session class.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

from .. import logs
from ..errors import ConnectError, ServerError
from ..resp import tls_context
from ..topology import SLOTS, discover
from ..urls import Endpoint
from .classify import FastMap
from .commandtable import CommandSpec, CommandTable
from .delivery import MarkDelivery
from .marks import MarkCallback
from .readiness import Readiness
from .router import Router

log = logs.get("durablecache.proxy")

S = TypeVar("S")
# What a server answers a client over its maxclients, before closing it (Valkey's exact words).
MAX_CLIENTS_ERROR: Final = b"-ERR max number of clients reached\r\n"
PREPARE_AT_ONCE: Final = 64     # PREPARE's connections being opened at one time (prepare_gate)
REFUSAL_LOG_EVERY: Final = 10.0     # seconds between log lines about refused clients
# A command the proxy handles itself (or watches on its way): handlers.SPECIAL.
Handler = Callable[[S, tuple[bytes, ...], CommandSpec | None], None]


class ProxyState(Generic[S]):
    def __init__(self, upstream: Endpoint, *, on_marks: MarkCallback, special: dict[bytes, Handler[S]],
                 require_auth: bool | None, migrating: bool, name_prefix: str):
        self.upstream = upstream
        self.require_auth = upstream.password is not None if require_auth is None else require_auth
        self.migrating = migrating
        self.name_prefix = name_prefix
        self.node_id = secrets.token_hex(20)
        self.shard_id = secrets.token_hex(20)
        self.connect_timeout = 5.0
        self.router = Router(False, [upstream], [])
        self.table: CommandTable
        self.special = special
        self.fastmap: FastMap               # set with the table (start, flip)
        self.sessions: dict[int, S] = {}
        # Sessions whose client left while writes were in flight: still awaiting replies/marks.
        self.departed: set[S] = set()
        # Sessions with writes sent and not settled (Outbox.count_writes adds, Outbox._settled drops):
        # FREEZE and the key hold look at these, not at every connected session.
        self.writing: set[S] = set()
        self.frozen = False
        self.held_by_freeze: list[S] = []   # sessions holding a write because of FREEZE (UNFREEZE releases)
        self.settled: asyncio.Event | None = None   # while FREEZE waits: set when a write settles
        # Cluster-wide commands (clusterwide.fan_out), set by the server: sessions reach it through
        # here because clusterwide.py builds on session.py.
        self.fan_out: Callable[..., None] | None = None
        self.flipping = False
        # FLIPs so far: a session whose ``side`` is older switches to ``router`` at its next quiet
        # moment (session.Session.catch_up), not all of them inside the write pause.
        self.side = 0
        # PREPARE: the next side's routing, for which sessions hold prepared connections (prepare.py)
        self.next_router: Router | None = None
        self.prepared_side = -1             # the FLIP (side) the prepared connections were made for
        # PREPARE's connections open this many at a time: thousands of connects and handshakes at once
        # would hold every client's commands (and the syncer) for hundreds of milliseconds.
        self.prepare_gate = asyncio.Semaphore(PREPARE_AT_ONCE)
        # Key-scoped hold (hold_keys): db -> keys whose writes are held; empty when none is.
        self.key_hold: dict[int, set[bytes]] = {}
        self.delivery = MarkDelivery(on_marks)
        # During a migration (classify.SCRIPTING): the SHA1s of the script bodies the proxy checked and
        # accepted (EVALSHA of any other gets NOSCRIPT), and the functions whose library it accepted
        # (FCALL of any other is refused). Shared by every session.
        self.script_shas: set[bytes] = set()
        self.functions: set[bytes] = set()
        # What each client connection announced and asked (the readiness report, readiness.py).
        self.readiness = Readiness()
        self._ssl: dict[Endpoint, ssl.SSLContext | None] = {}
        self._refresh: asyncio.Task[None] | None = None
        # stats
        self.commands = 0
        self.writes = 0
        self.held_total = 0
        self.writes_refused = 0     # refused while the coordinator was unreachable (fail closed)
        self.key_held_total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.bytes_up = 0
        self.reply_chunks = 0
        self.reply_chunks_counted = 0   # taken whole by the counted reply path (Upstream._count)
        self.connections_total = 0
        # Admission (session.Session.connection_made): at most ``max_clients`` sessions (0: no limit).
        self.max_clients = 0
        self.clients_refused = 0
        self._refusal_logged = 0.0
        # Cluster mode (cluster.py): the host (and port; 0: the one connected to) CLUSTER SLOTS/SHARDS/
        # NODES name, instead of the address the client connected to; and whether clients speak TLS.
        self.announce_host: str | None = None
        self.announce_port = 0
        self.serves_tls = False

    def refuse_client(self, transport: Any) -> None:
        """A client over ``max_clients``: the server's own error, then closed. The transport gets a
        bare protocol, so nothing the client sent meanwhile is read as a command. (Any: uvloop's
        transports are not the standard library's classes, and compiled code checks declared types.)"""
        self.clients_refused += 1
        transport.set_protocol(asyncio.Protocol())
        transport.write(MAX_CLIENTS_ERROR)
        transport.close()
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_EVERY:
            self._refusal_logged = now
            log.warning("proxy.max_clients_reached", max_clients=self.max_clients, refused=self.clients_refused)

    def use_table(self, table: CommandTable) -> None:
        """Commands are classified anew from ``table`` (at start, and for the new side at FLIP)."""
        self.table = table
        self.fastmap = FastMap(table, frozenset(self.special), self.migrating, self.router.cluster)

    def end_migration(self) -> None:
        """The migration ended and this proxy stays as the applications' front end (afterCutover:
        proxy): no more marks for a syncer, and nothing refused for the migration's sake any more."""
        self.migrating = False
        self.delivery.on_marks = _no_marks
        self.use_table(self.table)          # the fast path's classes depend on ``migrating``

    def holds(self, db: int, keys: list[bytes]) -> bool:
        """Does a write of ``keys`` in ``db`` touch a held key?"""
        held = self.key_hold.get(db)
        return held is not None and any(k in held for k in keys)

    def upstream_ssl(self, endpoint: Endpoint) -> ssl.SSLContext | None:
        if endpoint not in self._ssl:
            self._ssl[endpoint] = tls_context(endpoint)
        return self._ssl[endpoint]

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


def _no_marks(db: int, keys: list[bytes]) -> None:
    """on_marks once the migration is over: nobody copies the keys any more."""
