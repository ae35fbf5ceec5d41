"""What the proxy learns about its clients, for the readiness report (docs/limits.md, "Client
readiness"): which library and version each connection announced (``CLIENT SETINFO``), the RESP
version it speaks, whether it asks cluster questions (``CLUSTER ...``, ``READONLY``, ``ASKING``),
which databases it selects and which commands it sends that ElastiCache refuses.

Facts are kept per open connection (``ClientFacts``, bounded by the number of connections) and folded
into groups keyed by (library, version, client host) when the connection ends; at most
``MAX_GROUPS`` groups are kept, the connections of any further group are only counted. A group is
cluster-aware when any of its connections asked a cluster question: a cluster client's per-node
connections send only keyed commands, its first connection asks for the topology.

Only the commands the proxy handles on its general path are seen: the handlers call in here, the
fast path (plain reads and writes) costs nothing more.
"""

from __future__ import annotations

from typing import Any, Final

MAX_GROUPS: Final = 256        # closed-connection groups kept; more are counted in "otherConnections"
MAX_DBS: Final = 16            # databases remembered per connection / group
# Commands ElastiCache refuses (docs/aws.md, "Commands ElastiCache refuses"): an application sending
# them through the proxy will get "unknown command" from a durable target.
RESTRICTED: Final = frozenset({b"bgrewriteaof", b"bgsave", b"config", b"debug", b"migrate", b"psync",
                               b"replicaof", b"save", b"shutdown", b"slaveof", b"sync"})
UNKNOWN: Final = ""            # lib-name / lib-ver of a client that did not send CLIENT SETINFO


class ClientFacts:
    """One client connection, as far as the proxy could tell."""

    def __init__(self, host: str):
        self.host = host
        self.lib_name = UNKNOWN
        self.lib_ver = UNKNOWN
        self.resp = 2
        self.cluster = False
        self.dbs: set[int] = set()
        self.restricted: set[str] = set()

    def setinfo(self, attr: bytes, value: bytes) -> None:
        """``CLIENT SETINFO LIB-NAME|LIB-VER value`` (the server keeps the latest, so do we)."""
        text = value.decode(errors="replace")[:64]
        key = attr.lower()
        if key == b"lib-name":
            self.lib_name = text
        elif key == b"lib-ver":
            self.lib_ver = text

    def selected(self, db: int) -> None:
        if len(self.dbs) < MAX_DBS:
            self.dbs.add(db)

    def used(self, name: bytes) -> None:
        """A command whose use the report names (RESTRICTED)."""
        self.restricted.add(name.decode(errors="replace").upper())

    def key(self) -> tuple[str, str, str]:
        return self.lib_name, self.lib_ver, self.host


class _Group:
    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.cluster_connections = 0
        self.resp: set[int] = set()
        self.dbs: set[int] = set()
        self.restricted: set[str] = set()

    def add(self, facts: ClientFacts, is_open: bool) -> None:
        self.connections += 1
        self.open += int(is_open)
        self.cluster_connections += int(facts.cluster)
        self.resp.add(facts.resp)
        for db in facts.dbs:
            if len(self.dbs) < MAX_DBS:
                self.dbs.add(db)
        self.restricted |= facts.restricted

    def merged(self, other: _Group) -> _Group:
        out = _Group()
        out.connections = self.connections + other.connections
        out.open = self.open + other.open
        out.cluster_connections = self.cluster_connections + other.cluster_connections
        out.resp = self.resp | other.resp
        out.dbs = set(sorted(self.dbs | other.dbs)[:MAX_DBS])
        out.restricted = self.restricted | other.restricted
        return out


class Readiness:
    """Every client connection a proxy has had, grouped; bounded memory."""

    def __init__(self) -> None:
        self.live: dict[int, ClientFacts] = {}
        self.closed: dict[tuple[str, str, str], _Group] = {}
        self.other_connections = 0      # closed connections of groups beyond MAX_GROUPS

    def opened(self, sid: int, host: str) -> ClientFacts:
        facts = ClientFacts(host)
        self.live[sid] = facts
        return facts

    def ended(self, sid: int) -> None:
        facts = self.live.pop(sid, None)
        if facts is None:
            return
        key = facts.key()
        group = self.closed.get(key)
        if group is None:
            if len(self.closed) >= MAX_GROUPS:
                self.other_connections += 1
                return
            group = self.closed[key] = _Group()
        group.add(facts, False)

    def report(self) -> dict[str, Any]:
        """JSON for the admin API's /clients: one item per group, open connections included."""
        # Open connections are added into one group per key first, then merged once with the closed
        # ones: a merge per connection (two new groups and their sets each) took tens of milliseconds
        # with thousands open, on the thread that serves them.
        live: dict[tuple[str, str, str], _Group] = {}
        for facts in self.live.values():
            key = facts.key()
            group = live.get(key)
            if group is None:
                group = live[key] = _Group()
            group.add(facts, True)
        groups = dict(self.closed)
        for key, group in live.items():
            old = groups.get(key)
            groups[key] = group if old is None else old.merged(group)
        items = [group_json(key, g) for key, g in sorted(groups.items())]
        return {"groups": items, "otherConnections": self.other_connections,
                "connections": sum(g.connections for g in groups.values()) + self.other_connections,
                "open": len(self.live)}


def group_json(key: tuple[str, str, str], g: _Group) -> dict[str, Any]:
    lib, ver, host = key
    return {"lib": lib, "version": ver, "address": host,
            "mode": "cluster" if g.cluster_connections else "standalone",
            "connections": g.connections, "open": g.open, "resp": sorted(g.resp),
            "databases": sorted(g.dbs), "restricted": sorted(g.restricted)}
