"""The AUTH the proxy replays for a client on a connection it opens later (cluster: a shard's
connection opened lazily; standalone: the new side after FLIP) must never fall back silently to the
connection's previous user (``default``): if it is refused, the client's commands there fail with the
server's error."""

from __future__ import annotations

import pytest
import valkey
from rawclient import Raw, refused

pytestmark = pytest.mark.timeout(120)


def _acl_entries(client: valkey.Valkey) -> list[bytes]:
    """The objects of the server's ACL LOG entries (e.g. b'client|setname')."""
    out = []
    for entry in client.execute_command("ACL", "LOG"):
        if isinstance(entry, dict):
            out.append(entry.get("object", entry.get(b"object")))
        else:
            fields = dict(zip(entry[::2], entry[1::2]))
            out.append(fields[b"object"])
    return [o.encode() if isinstance(o, str) else o for o in out]


def _key_on(direct_nodes: dict[int, valkey.Valkey], port: int, prefix: str) -> str:
    """A key (``prefix`` + n) whose slot the node on ``port`` owns."""
    node = direct_nodes[port]
    for i in range(10000):
        key = f"{prefix}{i}"
        slot = node.execute_command("CLUSTER", "KEYSLOT", key)
        if node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) >= 0 and _owner(node, slot) == port:
            return key
    raise AssertionError("no key found")


def _owner(node: valkey.Valkey, slot: int) -> int:
    for lo, hi, primary, *_ in node.execute_command("CLUSTER", "SLOTS"):
        if lo <= slot <= hi:
            return int(primary[1])
    raise AssertionError(f"slot {slot} unowned")


@pytest.mark.parametrize("password", [None, "admin-pw"])      # `default` without and with a password
@pytest.mark.parametrize("how", ["auth", "hello"])
def test_cluster_auth_refused_on_a_shard_fails_commands_there(make_cluster, make_proxy, how, password):
    cluster = make_cluster(primaries=3, password=password)
    p = make_proxy(cluster.endpoint())
    first_port = p.proxy.router.nodes[0].port        # where the proxy sends the client's own AUTH
    direct = {n.port: n.client() for n in cluster.primaries}
    # The user exists on one primary only, and may read and write allowed:* only (no CLIENT, no PING).
    direct[first_port].execute_command("ACL", "SETUSER", "alice", "on", ">pw", "~allowed:*", "+get", "+set")
    c = Raw(p.port)
    if how == "auth":
        assert c("AUTH", "alice", "pw") == b"OK"
    else:
        assert isinstance(c("HELLO", "2", "AUTH", "alice", "pw"), list)
    for port, node in direct.items():
        allowed = _key_on(direct, port, "allowed:")
        forbidden = _key_on(direct, port, "forbidden:")
        node.set(forbidden, "secret")
        if port == first_port:
            assert c("SET", allowed, "v") == b"OK"
            assert c("GET", allowed) == b"v"
            assert refused(c("GET", forbidden), "NOPERM")
        else:
            # The user does not exist there: every command fails with the server's refusal, none
            # runs as `default` (which may read and write everything).
            for _ in range(2):       # the first request, and the next one (on a connection reopened)
                assert refused(c("GET", forbidden), "WRONGPASS")
                assert refused(c("SET", allowed, "v"), "WRONGPASS")
            assert node.get(allowed) is None
            replies = c.pipe(("SET", allowed, "1"), ("GET", forbidden), ("GET", allowed), ("PING",))
            assert all(refused(r, "WRONGPASS") for r in replies[:3]), replies
            assert node.get(allowed) is None
    # The proxy's housekeeping (naming its connection, learning its id) is no denial of alice's.
    log = _acl_entries(direct[first_port])
    assert not [o for o in log if o.startswith(b"client")], log
    assert any(o.startswith(b"forbidden:") for o in log), log   # the GET refused above, logged as it should be


def test_cluster_auth_after_connections_opened_follows_or_fails(make_cluster, make_proxy):
    """Connections to every shard opened as `default` first; then AUTH as a user known to one shard:
    the other shards' connections must not go on as `default`."""
    cluster = make_cluster(primaries=3)
    p = make_proxy(cluster.endpoint())
    first_port = p.proxy.router.nodes[0].port
    direct = {n.port: n.client() for n in cluster.primaries}
    direct[first_port].execute_command("ACL", "SETUSER", "bob", "on", ">pw", "~allowed:*", "+get", "+set")
    c = Raw(p.port)
    keys = {port: _key_on(direct, port, "forbidden:") for port in direct}
    for key in keys.values():
        assert c("GET", key) is None          # as default: allowed everywhere
    # AUTH and, pipelined right behind it, a write to every shard.
    replies = c.pipe(("AUTH", "bob", "pw"), *[("SET", key, "x") for key in keys.values()])
    assert replies[0] == b"OK"
    for (port, key), reply in zip(keys.items(), replies[1:]):
        if port == first_port:
            assert refused(reply, "NOPERM")
            assert refused(c("GET", key), "NOPERM")
        else:
            assert refused(reply, "WRONGPASS"), reply
            assert refused(c("SET", key, "x"), "WRONGPASS")
        assert direct[port].get(key) is None


def test_standalone_user_changed_before_the_flip(make_server, make_proxy):
    """The client's AUTH is replayed on the new side after FLIP; the user's password differs there:
    its commands fail with the server's WRONGPASS, they do not run as `default`."""
    old = make_server()
    new = make_server()
    old.client().execute_command("ACL", "SETUSER", "carol", "on", ">pw", "~allowed:*", "+get", "+set")
    new.client().execute_command("ACL", "SETUSER", "carol", "on", ">changed", "~allowed:*", "+get", "+set")
    p = make_proxy(old.endpoint())
    c = Raw(p.port)
    assert c("AUTH", "carol", "pw") == b"OK"
    assert c("SET", "allowed:1", "a") == b"OK"
    assert refused(c("GET", "forbidden:1"), "NOPERM")
    p.run(p.proxy.freeze(5))
    p.run(p.proxy.flip(new.endpoint()))
    p.call(p.proxy.unfreeze)
    for _ in range(2):
        assert refused(c("SET", "forbidden:1", "x"), "WRONGPASS")
        replies = c.pipe(("GET", "allowed:1"), ("SET", "forbidden:2", "y"), ("CLIENT", "GETNAME"))
        assert refused(replies[0], "WRONGPASS") and refused(replies[1], "WRONGPASS"), replies
    assert new.client().get("forbidden:1") is None
    assert new.client().get("forbidden:2") is None
    # Authenticating again with the new password works on the new side.
    assert c("AUTH", "carol", "changed") == b"OK"
    assert c("SET", "allowed:2", "b") == b"OK"
    assert new.client().get("allowed:2") == b"b"
    assert refused(c("GET", "forbidden:1"), "NOPERM")
