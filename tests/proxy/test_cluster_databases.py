"""SELECT through the proxy on a Valkey 9 cluster with numbered databases (cluster-databases)."""

from __future__ import annotations

import pytest

from durablecache.testing.localvalkey import LocalServer

pytestmark = pytest.mark.timeout(120)


def test_select_through_the_proxy_reaches_every_shard_of_a_cluster_with_databases(make_cluster, make_proxy):
    """SELECT on a cluster upstream with cluster-databases: every node connection of the session
    follows, those open already and those opened later; SELECT inside MULTI is refused clearly."""
    cluster = make_cluster(primaries=3, engine="valkey9", extra=["--cluster-databases", "4"])
    p = make_proxy(cluster.endpoint(), migrating=False)
    c = LocalServer.client(cluster.primaries[0], port=p.port)
    keys = [f"s:{i}" for i in range(30)]
    for k in keys:                               # opens a connection to every shard, in db 0
        c.set(k, "db0")
    assert c.execute_command("SELECT", 2) in (b"OK", True)
    for k in keys:
        c.set(k, "db2")
    assert c.dbsize() == len(keys)               # fanned out, in db 2 on every primary
    for db, want in ((0, "db0"), (2, "db2")):
        found = {}
        for node in cluster.primaries:
            n = node.client(db=db)
            found.update({k.decode(): n.get(k) for k in n.keys("s:*")})
            n.close()
        assert found == {k: want.encode() for k in keys}, db
    with pytest.raises(Exception, match="SELECT inside MULTI is not supported in cluster mode"):
        pipe = c.pipeline(transaction=True)
        pipe.execute_command("SELECT", 1)
        pipe.set("s:0", "x")
        pipe.execute()
    c.close()
