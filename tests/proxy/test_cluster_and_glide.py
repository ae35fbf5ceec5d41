"""Cluster mode (the proxy as a one-node cluster) with valkey-py's ValkeyCluster, and Valkey GLIDE
(RESP3 by default) in standalone and cluster mode — all unchanged client code."""

from __future__ import annotations

import asyncio

import pytest
import valkey
from valkey.cluster import ValkeyCluster

pytestmark = pytest.mark.timeout(120)


def test_valkey_py_cluster_client_through_the_proxy(make_cluster, make_proxy):
    cluster = make_cluster(primaries=3)
    p = make_proxy(cluster.endpoint())
    rc = ValkeyCluster(host="127.0.0.1", port=p.port, socket_timeout=10)
    nodes = rc.get_nodes()
    assert [(n.host, n.port) for n in nodes] == [("127.0.0.1", p.port)]
    keys = [f"user:{i}" for i in range(60)]
    for k in keys:
        rc.set(k, k)
    assert [rc.get(k) for k in keys] == [k.encode() for k in keys]
    pipe = rc.pipeline()
    for k in keys:
        pipe.get(k)
    assert pipe.execute() == [k.encode() for k in keys]
    rc.mset({"{tag}a": "1", "{tag}b": "2"})
    assert rc.mget("{tag}a", "{tag}b") == [b"1", b"2"]
    with pytest.raises(valkey.ResponseError, match="same slot"):
        rc.execute_command("MSET", "a", "1", "b", "2", target_nodes=nodes[0])
    # Every key landed on its real owner, and the marks are exactly the written keys (db 0).
    direct = cluster.cluster_client()
    assert all(direct.get(k) == k.encode() for k in keys)
    assert p.keys(0) == {k.encode() for k in keys} | {b"{tag}a", b"{tag}b"}
    assert {d for d, _ in p.marks} == {0}
    # A transaction on one slot.
    plain = valkey.Valkey(port=p.port, socket_timeout=10)
    tx = plain.pipeline(transaction=True)
    tx.incr("{c}n").incr("{c}n")
    assert tx.execute() == [1, 2]
    assert direct.get("{c}n") == b"2"
    assert plain.execute_command("CLUSTER", "MYID") == p.proxy.node_id.encode()
    assert plain.execute_command("READONLY") in (True, b"OK")


def test_cluster_follows_moved_after_a_slot_moves(make_cluster, make_proxy):
    cluster = make_cluster(primaries=2)
    p = make_proxy(cluster.endpoint())
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    c.set("movable", "1")
    a, b = cluster.primaries
    slot = a.client().execute_command("CLUSTER", "KEYSLOT", "movable")
    owner, other = (a, b) if a.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) else (b, a)
    # Move the slot (and its key) by hand: the proxy's slot map is now stale.
    owner_id = owner.client().execute_command("CLUSTER", "MYID")
    other_id = other.client().execute_command("CLUSTER", "MYID")
    other.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", owner_id)
    owner.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", other_id)
    owner.client().execute_command("MIGRATE", "127.0.0.1", other.port, "", 0, 5000, "KEYS", "movable")
    for node in (owner, other):
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", other_id)
    assert c.get("movable") == b"1"         # MOVED followed by the proxy
    assert c.set("movable", "2") and other.client().get("movable") == b"2"


def test_glide_standalone_and_cluster(source, make_cluster, make_proxy):
    glide = pytest.importorskip("glide", reason="pip install valkey-glide")
    cluster = make_cluster(primaries=3)
    ps = make_proxy(source.endpoint())
    pc = make_proxy(cluster.endpoint())

    async def main() -> None:
        cfg = glide.GlideClientConfiguration([glide.NodeAddress("127.0.0.1", ps.port)], request_timeout=5000)
        client = await glide.GlideClient.create(cfg)
        assert await client.set("g", "1") == "OK"
        assert await client.get("g") == b"1"
        assert await client.hset("gh", {"f": "v"}) == 1
        batch = glide.Batch(is_atomic=True)
        batch.incr("gc")
        batch.incr("gc")
        assert await client.exec(batch, raise_on_error=True) == [1, 2]
        await client.close()
        ccfg = glide.GlideClusterClientConfiguration([glide.NodeAddress("127.0.0.1", pc.port)],
                                                     request_timeout=5000)
        cc = await glide.GlideClusterClient.create(ccfg)
        for i in range(30):
            assert await cc.set(f"gk{i}", str(i)) == "OK"
        assert [await cc.get(f"gk{i}") for i in range(30)] == [str(i).encode() for i in range(30)]
        await cc.close()
    asyncio.run(asyncio.wait_for(main(), 60))
    assert {b"g", b"gh", b"gc"} <= ps.keys(0)
    assert pc.keys(0) == {f"gk{i}".encode() for i in range(30)}
    direct = cluster.cluster_client()
    assert direct.get("gk7") == b"7"
