"""The whole migration on servers that refuse what ElastiCache refuses (docs/aws.md): CONFIG, DEBUG,
SYNC/PSYNC, REPLICAOF/SLAVEOF, SAVE/BGSAVE/BGREWRITEAOF, SHUTDOWN and MIGRATE renamed away, and in
cluster mode the administrative CLUSTER subcommands denied. Nothing DurableCache does may depend on
them: the copy, the syncer, the witness and the gate, the proxy and the cutover."""

from __future__ import annotations

import asyncio

import pytest
import valkey

from test_migrate import migrate_under_load


def test_the_servers_really_refuse_them(make_server, make_cluster):
    server = make_server(engine="valkey9", elasticache=True)
    for command in (("CONFIG", "GET", "maxmemory"), ("SAVE",), ("DEBUG", "SLEEP", "0"), ("REPLICAOF", "NO", "ONE")):
        with pytest.raises(valkey.ResponseError, match="unknown command"):
            server.client().execute_command(*command)
    cluster = make_cluster(primaries=3, engine="valkey9", elasticache=True)
    with pytest.raises(valkey.exceptions.NoPermissionError):
        cluster.nodes[0].client().execute_command("CLUSTER", "FORGET", "0" * 40)
    assert cluster.nodes[0].client().execute_command("CLUSTER", "MYID")


def test_a_migration_on_elasticache_like_servers(make_server):
    source = make_server(engine="valkey8", elasticache=True)
    target = make_server(engine="valkey9", elasticache=True)
    r = asyncio.run(migrate_under_load(source, target, cluster=False, keys=3000))
    assert r["acked"] > 300
    assert r["lost"] == []
    assert r["equal"]


def test_a_cluster_migration_on_elasticache_like_servers(make_cluster):
    source = make_cluster(primaries=3, engine="valkey8", elasticache=True)
    target = make_cluster(primaries=3, engine="valkey9", elasticache=True)
    r = asyncio.run(migrate_under_load(source, target, cluster=True, keys=3000))
    assert r["lost"] == []
    assert r["equal"]
