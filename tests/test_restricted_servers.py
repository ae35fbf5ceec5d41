"""The ElastiCache-restricted test servers themselves (localvalkey ``elasticache=True``): what the
harness may still do on them, and a cluster with replicas, whose replication must keep SYNC/PSYNC
while its clients may not run them. The migrations on such servers are in
test_elasticache_restrictions.py, the operator's in tests/kube/test_restricted_e2e.py and the fault
matrix's in tests/faults (fault_cells.RESTRICTED)."""

from __future__ import annotations

import asyncio

import pytest
import valkey

from durablecache.testing.localvalkey import ELASTICACHE_HARNESS, ELASTICACHE_RENAMED
from test_migrate import migrate_under_load


def test_only_the_harness_reaches_config_and_save(make_server):
    server = make_server(engine="valkey9", elasticache=True)
    c = server.client()
    for name in ELASTICACHE_RENAMED:
        with pytest.raises(valkey.ResponseError, match="unknown command"):
            c.execute_command(name)
    # Not guessable from a client's point of view: the harness names are made up per test process.
    assert all(n.startswith(f"{base}-harness-") and len(n) > len(base) + 12 for base, n in ELASTICACHE_HARNESS.items())
    server.admin("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    assert server.admin("CONFIG", "GET", "maxmemory-policy") == [b"maxmemory-policy", b"allkeys-lru"]
    c.set("kept", "1")
    c.close()
    server.restart(keep_data=True)       # SAVE under its harness name, then a crash and a restart
    c = server.client()
    assert c.get("kept") == b"1"
    with pytest.raises(valkey.ResponseError, match="unknown command"):
        c.execute_command("CONFIG", "GET", "maxmemory")
    c.close()


def test_a_replicated_cluster_replicates_but_its_clients_cannot_sync(make_cluster):
    cluster = make_cluster(primaries=3, replicas=1, engine="valkey9", elasticache=True)
    primary = cluster.nodes[0].client()
    for command in (("PSYNC", "?", "-1"), ("SYNC",)):
        with pytest.raises(valkey.exceptions.NoPermissionError):
            primary.execute_command(*command)
    for command in (("CONFIG", "GET", "maxmemory"), ("REPLICAOF", "NO", "ONE")):
        with pytest.raises(valkey.ResponseError, match="unknown command"):
            primary.execute_command(*command)
    with pytest.raises(valkey.exceptions.NoPermissionError):
        primary.execute_command("CLUSTER", "FAILOVER")
    primary.close()
    replicas = cluster.nodes[cluster.n_primaries:]
    assert all(r.client().info("replication")["master_link_status"] == "up" for r in replicas)


def test_a_cluster_migration_between_replicated_restricted_clusters(make_cluster):
    source = make_cluster(primaries=3, replicas=1, engine="valkey8", elasticache=True)
    target = make_cluster(primaries=3, replicas=1, engine="valkey9", elasticache=True)
    r = asyncio.run(migrate_under_load(source, target, cluster=True, keys=2000))
    assert r["lost"] == []
    assert r["equal"]
    assert r["acked"] > 300
