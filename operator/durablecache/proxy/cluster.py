"""Cluster mode: the proxy presents itself as a one-node cluster that owns all 16384 slots.

Cluster clients (valkey-py ValkeyCluster, GLIDE) learn the topology from CLUSTER SLOTS/SHARDS/NODES;
answering those locally with the proxy's own address keeps every client connection on the proxy,
which routes each command to the real primary of its slot and follows MOVED/ASK itself.

Which address: by default the one the client connected to. With an announced host name (``--announce``,
``spec.proxy.announceHost``) the proxy answers as a node with ``cluster-announce-hostname`` set and
``cluster-preferred-endpoint-type hostname`` does: SLOTS names the host (the IP goes into the entry's
metadata), SHARDS has ``endpoint`` and ``hostname`` set to it (``ip`` stays the address), NODES appends
``,host`` to the address. Clients then connect to, and verify the certificate against, that name.

CLUSTER subcommands about a slot are a node's business, and to a client that node is the proxy: they go
to the primary that owns the slot (slot_node), where the slot's keys are.
"""

from __future__ import annotations

from typing import Any

from . import framing
from .router import Router
from .state import ProxyState

LOCAL_SUBCOMMANDS = frozenset({b"slots", b"shards", b"nodes", b"info", b"myid", b"myshardid"})
# Subcommands whose first argument is a slot. A cluster client sends the first five to that slot's node
# (valkey-py routes by the first slot); ADDSLOTS/ADDSLOTSRANGE it sends to the node it names, here the
# proxy, which owns every slot: giving a slot back goes to the primary the proxy sends its keys to.
# Anywhere else DELSLOTS would unassign the slot on a node that does not serve it, COUNTKEYSINSLOT
# would count another node's keys.
SLOT_SUBCOMMANDS = frozenset({b"countkeysinslot", b"getkeysinslot", b"setslot", b"delslots",
                              b"delslotsrange", b"addslots", b"addslotsrange"})


def local_cluster_reply(proxy: ProxyState[Any], sub: bytes, addr: tuple[str, int], resp3: bool) -> bytes | None:
    """The reply to ``CLUSTER <sub>`` answered by the proxy, or None to forward it upstream."""
    if sub not in LOCAL_SUBCOMMANDS:
        return None
    ip, port = addr
    if proxy.announce_port:
        port = proxy.announce_port
    hostname = proxy.announce_host
    node_id = proxy.node_id
    if sub == b"myid":
        return framing.bulk(node_id)
    if sub == b"myshardid":
        return framing.bulk(proxy.shard_id)
    if sub == b"slots":
        entry: list[Any] = [ip, port, node_id]
        if hostname:
            entry = [hostname, port, node_id, {"ip": ip}]
        return framing.encode([[0, 16383, entry]], resp3)
    if sub == b"shards":
        # A server reports "tls-port" to TLS clients of a TLS-only node, "port" otherwise.
        node: dict[str, Any] = {"id": node_id, "tls-port" if proxy.serves_tls else "port": port, "ip": ip,
                                "endpoint": hostname or ip}
        if hostname:
            node["hostname"] = hostname
        node.update({"role": "master", "replication-offset": 0, "health": "online"})
        return framing.encode([{"slots": [0, 16383], "nodes": [node]}], resp3)
    if sub == b"nodes":
        address = f"{ip}:{port}@0" + (f",{hostname}" if hostname else "")
        line = f"{node_id} {address} myself,master - 0 0 1 connected 0-16383\n"
        return framing.bulk(line)
    info = ("cluster_enabled:1\r\ncluster_state:ok\r\ncluster_slots_assigned:16384\r\n"
            "cluster_slots_ok:16384\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\n"
            "cluster_known_nodes:1\r\ncluster_size:1\r\ncluster_current_epoch:1\r\n"
            "cluster_my_epoch:1\r\n")
    return framing.bulk(info)


def slot_node(router: Router, sub: bytes, args: tuple[bytes, ...]) -> int:
    """The primary (index into router.nodes) that ``CLUSTER <sub> <slot> …`` goes to: the owner of
    its first slot in the proxy's map; -1 when it names no valid slot (the server answers the error)
    or no primary owns the slot."""
    if sub not in SLOT_SUBCOMMANDS or len(args) < 3 or not args[2].isdigit():
        return -1
    slot = int(args[2])
    return router.owner[slot] if slot < len(router.owner) else -1
