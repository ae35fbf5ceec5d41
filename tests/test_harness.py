"""The harness itself: servers really start, with auth, in cluster mode and with TLS."""

import valkey


def test_standalone_with_password_and_acl_user(make_server):
    server = make_server(password="pw", acl_user=("alice", "wonder"))
    assert server.client().ping()
    alice = server.client(username="alice", password="wonder")
    assert alice.set("k", "v") and alice.get("k") == b"v"
    try:
        server.client(password=None).get("k")
    except valkey.AuthenticationError:
        pass
    else:
        raise AssertionError("a client without a password was let in")


def test_cluster_with_replicas_owns_all_slots(make_cluster):
    cluster = make_cluster(primaries=3, replicas=1)
    client = cluster.cluster_client()
    for i in range(100):
        client.set(f"k{i}", i)
    assert sum(n.client().dbsize() for n in cluster.primaries) == 100
    info = cluster.nodes[0].client().execute_command("CLUSTER", "INFO").decode()
    assert "cluster_slots_assigned:16384" in info
    assert "cluster_known_nodes:6" in info


def test_tls_server_needs_tls(tls_server):
    assert tls_server.client().ping()
    plain = valkey.Valkey(host="127.0.0.1", port=tls_server.port, socket_timeout=2, password="tls-secret")
    try:
        plain.ping()
    except (valkey.ConnectionError, valkey.TimeoutError):
        pass
    else:
        raise AssertionError("the TLS port answered plain text")
