"""The findings of the transactions issue, with Valkey GLIDE (the client AWS recommends) against a
real 3-primary cluster through the proxy: GLIDE sees one node (the proxy) and sends it what it would
have sent to every primary; the proxy must fan that out (clusterwide.py) and keep atomic batches
atomic. valkey-py's side of the same findings: test_cluster_fanout.py, test_transactions.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import valkey

glide = pytest.importorskip("glide", reason="valkey-glide is a test dependency (pyproject [test])")

pytestmark = pytest.mark.timeout(120)


def keys_on_every_shard(cluster: Any, n: int = 60) -> list[str]:
    keys = [f"k:{i}" for i in range(n)]
    direct = cluster.cluster_client()
    for k in keys:
        direct.set(k, k)
    assert len({direct.get_node_from_key(k).port for k in keys}) == 3, "the keys must span every shard"
    direct.close()
    return keys


def through_glide(port: int, body: Callable[[Any], Awaitable[None]], protocol: Any = None) -> None:
    async def main() -> None:
        cfg = glide.GlideClusterClientConfiguration([glide.NodeAddress("127.0.0.1", port)], request_timeout=5000,
                                                    protocol=protocol or glide.ProtocolVersion.RESP3)
        client = await glide.GlideClusterClient.create(cfg)
        try:
            await body(client)
        finally:
            await client.close()
    asyncio.run(asyncio.wait_for(main(), 90))


@pytest.mark.parametrize("protocol", ["RESP2", "RESP3"])
def test_glide_sees_every_shard_through_keyless_commands(make_cluster, make_proxy, protocol):
    cluster = make_cluster(primaries=3, engine="valkey9")
    keys = keys_on_every_shard(cluster)
    p = make_proxy(cluster.endpoint(), migrating=False)
    expected = {k.encode() for k in keys}

    async def body(client: Any) -> None:
        assert await client.dbsize() == len(keys)
        assert await client.random_key() in expected
        seen: set[bytes] = set()
        cursor = glide.ClusterScanCursor()
        for _ in range(1000):                       # bounded: 60 keys, count 7
            cursor, found = await client.scan(cursor, count=7)
            seen.update(found)
            if cursor.is_finished():
                break
        assert seen == expected
    through_glide(p.port, body, getattr(glide.ProtocolVersion, protocol))


def test_glide_scripts_functions_config_and_flushall_reach_every_primary(make_cluster, make_proxy):
    cluster = make_cluster(primaries=3, engine="valkey9")
    keys = keys_on_every_shard(cluster)
    p = make_proxy(cluster.endpoint(), migrating=False)

    async def body(client: Any) -> None:
        script = glide.Script("return redis.call('GET', KEYS[1])")
        for k in keys:                               # EVALSHA on every shard finds the script
            assert await client.invoke_script(script, keys=[k]) == k.encode()
        await client.function_load("#!lua name=glidelib\n"
                                   "server.register_function('get1', function(k) return server.call('GET', k[1]) end)")
        for k in keys:
            assert await client.fcall("get1", keys=[k]) == k.encode()
        assert await client.config_set({"maxmemory-samples": "7"}) == "OK"
        assert await client.flushall() == "OK"
        assert await client.dbsize() == 0
    through_glide(p.port, body)
    for node in cluster.primaries:
        c = node.client()
        assert c.config_get("maxmemory-samples") == {"maxmemory-samples": "7"}
        assert c.dbsize() == 0
        assert c.function_list(library="glidelib"), f"{node.port} lacks the library"
        c.close()


def test_glide_user_made_through_the_proxy_writes_as_itself_on_every_shard(make_cluster, make_proxy):
    cluster = make_cluster(primaries=3, engine="valkey9")
    keys = keys_on_every_shard(cluster)
    p = make_proxy(cluster.endpoint(), migrating=False)

    async def make_user(client: Any) -> None:
        assert await client.custom_command(["ACL", "SETUSER", "glideapp", "on", ">s3cret", "~k:*", "+@all"]) == "OK"
    through_glide(p.port, make_user)

    async def as_user() -> None:
        cfg = glide.GlideClusterClientConfiguration(
            [glide.NodeAddress("127.0.0.1", p.port)], request_timeout=5000,
            credentials=glide.ServerCredentials("s3cret", "glideapp"))
        client = await glide.GlideClusterClient.create(cfg)
        try:
            for k in keys:
                assert await client.set(k, "by-glideapp") == "OK"
            with pytest.raises(glide.RequestError, match="No permissions"):
                await client.set("other", "x")      # its key pattern holds, whichever shard owns "other"
        finally:
            await client.close()
    asyncio.run(asyncio.wait_for(as_user(), 60))
    direct = cluster.cluster_client()
    assert all(direct.get(k) == b"by-glideapp" for k in keys)
    direct.close()


@pytest.mark.parametrize("protocol", ["RESP2", "RESP3"])
def test_glide_atomic_batch_mixing_keyless_commands(make_cluster, make_proxy, protocol):
    """An atomic batch with keyless commands among keyed ones of one slot runs as one MULTI/EXEC on
    the slot's primary, as a cluster client sends it; a keyless-only one runs on one node, as on a
    cluster. (GLIDE refuses a cross-slot atomic batch itself; the proxy's CROSSSLOT answer is tested
    with raw commands in test_transactions.py.)"""
    cluster = make_cluster(primaries=3, engine="valkey9")
    p = make_proxy(cluster.endpoint(), migrating=False)

    async def body(client: Any) -> None:
        batch = glide.ClusterBatch(is_atomic=True)
        batch.set("{u}a", "1")
        batch.ping()
        batch.echo("e")
        batch.get("{u}a")
        batch.client_getname()
        assert await client.exec(batch, raise_on_error=True) == ["OK", b"PONG", b"e", b"1", None]
        keyless = glide.ClusterBatch(is_atomic=True)
        keyless.ping()
        keyless.dbsize()
        # On a cluster GLIDE sends a keyless atomic batch to one node; DBSIZE in it counts that node.
        result = await client.exec(keyless, raise_on_error=True)
        assert result is not None and result[0] == b"PONG" and isinstance(result[1], int)
    through_glide(p.port, body, getattr(glide.ProtocolVersion, protocol))


@pytest.mark.parametrize("protocol", ["RESP2", "RESP3"])
def test_glide_standalone_batch_with_client_getname(source, make_proxy, protocol):
    """Standalone: CLIENT GETNAME inside an atomic batch is queued like the rest, so EXEC's reply has
    one element per command (GLIDE's own batch tests failed on this)."""
    p = make_proxy(source.endpoint(), migrating=False)

    async def main() -> None:
        cfg = glide.GlideClientConfiguration([glide.NodeAddress("127.0.0.1", p.port)], request_timeout=5000,
                                             client_name="glide-std",
                                             protocol=getattr(glide.ProtocolVersion, protocol))
        client = await glide.GlideClient.create(cfg)
        try:
            batch = glide.Batch(is_atomic=True)
            batch.set("std:a", "1")
            batch.client_getname()
            batch.get("std:a")
            assert await client.exec(batch, raise_on_error=True) == ["OK", b"glide-std", b"1"]
        finally:
            await client.close()
    asyncio.run(asyncio.wait_for(main(), 60))
    assert valkey.Valkey(port=source.port).get("std:a") == b"1"


def test_glide_chained_watch_transactions_in_cluster_mode(make_cluster, make_proxy):
    """Transactions chained on one GLIDE client (WATCH, atomic batch, again on another slot, then one
    that a concurrent write must abort): each EXEC is applied or aborted exactly as the server decides
    (the transactions issue saw one EXEC return null in GLIDE's chained test through the proxy)."""
    cluster = make_cluster(primaries=3, engine="valkey9")
    p = make_proxy(cluster.endpoint())
    direct = cluster.cluster_client()

    async def body(client: Any) -> None:
        for round_ in range(20):
            key = f"chain:{round_}"                   # a new slot, often a new shard, each round
            assert await client.watch([key]) == "OK"
            batch = glide.ClusterBatch(is_atomic=True)
            batch.incr(key)
            batch.get(key)
            assert await client.exec(batch, raise_on_error=True) == [1, b"1"], round_
        assert await client.watch(["chain:0"]) == "OK"
        direct.set("chain:0", "moved")               # another client writes the watched key
        batch = glide.ClusterBatch(is_atomic=True)
        batch.set("chain:0", "mine")
        assert await client.exec(batch, raise_on_error=True) is None
        batch = glide.ClusterBatch(is_atomic=True)    # the next one, unwatched, applies
        batch.set("chain:1", "after")
        assert await client.exec(batch, raise_on_error=True) == ["OK"]
    through_glide(p.port, body)
    assert direct.get("chain:0") == b"moved" and direct.get("chain:1") == b"after"
    direct.close()
