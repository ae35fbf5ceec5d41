"""Cluster-wide commands through the proxy (one node to its clients) against a real 3-primary cluster:
what a cluster client would have sent to every primary reaches every primary (clusterwide.py)."""

from __future__ import annotations

import pytest
import valkey

from durablecache.testing.waiting import wait_for

pytestmark = pytest.mark.timeout(120)


def keys_on_every_shard(cluster, n: int = 60) -> list[str]:
    keys = [f"k:{i}" for i in range(n)]
    direct = cluster.cluster_client()
    for k in keys:
        direct.set(k, k)
    owners = {direct.get_node_from_key(k).port for k in keys}
    assert len(owners) == 3, "the keys must span every shard for these checks to mean anything"
    direct.close()
    return keys


def test_keyspace_commands_see_every_shard(make_cluster, make_proxy):
    cluster = make_cluster(primaries=3, engine="valkey9")
    keys = keys_on_every_shard(cluster)
    p = make_proxy(cluster.endpoint(), migrating=False)
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    assert c.dbsize() == len(keys)
    assert sorted(c.keys("k:*")) == sorted(k.encode() for k in keys)
    assert sorted(c.scan_iter(count=7)) == sorted(k.encode() for k in keys)   # many cursors, every shard
    assert c.info("keyspace")["db0"]["keys"] == len(keys)
    assert c.randomkey() in {k.encode() for k in keys}
    with pytest.raises(valkey.ResponseError, match="invalid cursor"):
        c.execute_command("SCAN", str(1023))       # names a shard that does not exist


def test_scripts_and_config_reach_every_primary_and_flushall_empties_all(make_cluster, make_proxy):
    cluster = make_cluster(primaries=3, engine="valkey9")
    keys = keys_on_every_shard(cluster)
    p = make_proxy(cluster.endpoint(), migrating=False)
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    sha = c.script_load("return redis.call('GET', KEYS[1])")
    assert all(c.evalsha(sha, 1, k) == k.encode() for k in keys)   # no NOSCRIPT on any shard
    assert c.script_exists(sha) == [True]
    assert c.config_set("slowlog-max-len", 77)
    for node in cluster.primaries:
        assert node.client().config_get("slowlog-max-len") == {"slowlog-max-len": "77"}
    assert c.flushall()
    assert all(node.client().dbsize() == 0 for node in cluster.primaries)
    assert c.script_flush() and c.script_exists(sha) == [False]


def test_client_list_and_kill_never_show_or_reach_durablecache(make_cluster, make_proxy):
    cluster = make_cluster(primaries=3, engine="valkey9")
    keys_on_every_shard(cluster)
    p = make_proxy(cluster.endpoint(), migrating=False)
    me = valkey.Valkey(port=p.port, socket_timeout=10, client_name="web-1")
    other = valkey.Valkey(port=p.port, socket_timeout=10, client_name="web-2")
    other.ping()
    seen = me.client_list()
    names = [c["name"] for c in seen]
    assert sorted(n for n in names if n) == ["web-1", "web-2"], names     # each session once
    assert not [n for n in names if n.startswith("durablecache")]
    assert me.client_kill_filter(_type="normal", skipme=True) == len(seen) - 1   # all but me
    # web-2's session ends with its upstream connection (not asked again: the client would reconnect)
    wait_for("only web-1 named upstream", lambda: [c["name"] for c in me.client_list() if c["name"]] == ["web-1"], 10)
    assert me.ping()
    for node in cluster.primaries:     # my session's upstream connections, on every node, untouched
        assert [c for c in node.client().client_list() if c["name"].startswith("durablecache-proxy-")]


def test_functions_and_users_reach_every_shard(make_cluster, make_proxy):
    """FUNCTION LOAD then FCALL on keys of every shard; a user made through the proxy exists on every
    shard (AUTH as it, then a write on each shard runs as it, not as default)."""
    cluster = make_cluster(primaries=3, engine="valkey9")
    keys = keys_on_every_shard(cluster)
    p = make_proxy(cluster.endpoint(), migrating=False)
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    c.function_load("#!lua name=lib\nserver.register_function('get1', function(k) return server.call('GET', k[1]) end)")
    assert all(c.fcall("get1", 1, k) == k.encode() for k in keys)
    assert c.acl_setuser("app", enabled=True, passwords=["+s3cret"], keys=["k:*"], commands=["+@all"])
    for node in cluster.primaries:
        assert node.client().acl_getuser("app") is not None
    app = valkey.Valkey(port=p.port, socket_timeout=10, username="app", password="s3cret")
    for k in keys:
        app.set(k, "by-app")
    with pytest.raises(valkey.exceptions.NoPermissionError):
        app.set("other", "x")          # the user's key pattern holds on whichever shard owns it


def test_client_pause_pauses_every_primary(make_cluster, make_proxy):
    """CLIENT PAUSE has no tips, yet a pause that left the other shards taking writes would not be the
    pause the client asked for: it reaches every primary, and so does CLIENT UNPAUSE."""
    cluster = make_cluster(primaries=3, engine="valkey9")
    p = make_proxy(cluster.endpoint(), migrating=False)
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    assert c.client_pause(60_000, all=False)
    try:
        for node in cluster.primaries:
            assert "write" in node.client().info("clients").get("paused_actions", ""), node.port
    finally:
        assert c.client_unpause()
    for node in cluster.primaries:
        assert node.client().info("clients").get("paused_actions", "none") == "none"
