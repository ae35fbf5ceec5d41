"""TLS for clients, with host-name verification on, and the announced host name in cluster mode.

The proxy's certificate names only ``localhost`` (no IP address): a client that verifies the host name
is accepted at ``localhost`` and refused at ``127.0.0.1``. A cluster client reconnects to whatever
CLUSTER SLOTS names, so without ``announce_host`` it would verify 127.0.0.1 and fail; with it, it
verifies ``localhost`` and works — for valkey-py and GLIDE alike."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
import valkey
from certs import certs_for
from rawclient import Raw
from valkey.cluster import ValkeyCluster

pytestmark = pytest.mark.timeout(120)
HOST = "localhost"


@pytest.fixture(scope="module")
def localhost_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA and a server certificate for the DNS name localhost only."""
    return certs_for(tmp_path_factory.mktemp("tls-localhost"), HOST)


def server_context(certs: dict[str, str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs["cert"], certs["key"])
    return ctx


def verified(certs: dict[str, str]) -> dict[str, Any]:
    """valkey-py's settings for TLS with the CA and host-name verification (off by default there)."""
    return {"ssl": True, "ssl_ca_certs": certs["ca"], "ssl_check_hostname": True, "ssl_cert_reqs": "required",
            "socket_timeout": 10}


def glide_tls(certs: dict[str, str]) -> Any:
    import glide
    return glide.TlsAdvancedConfiguration(root_pem_cacerts=Path(certs["ca"]).read_bytes())


def test_standalone_tls_clients_verify_the_host_name(source, make_proxy, localhost_certs) -> None:
    import glide
    p = make_proxy(source.endpoint(), client_tls=server_context(localhost_certs))
    c = valkey.Valkey(host=HOST, port=p.port, **verified(localhost_certs))
    assert c.set("t", "1") and c.get("t") == b"1"
    assert source.client().get("t") == b"1"
    with pytest.raises(valkey.ConnectionError, match="certificate verify failed"):
        valkey.Valkey(host="127.0.0.1", port=p.port, **verified(localhost_certs)).ping()

    async def main() -> None:
        cfg = glide.GlideClientConfiguration(
            [glide.NodeAddress(HOST, p.port)], use_tls=True, request_timeout=5000,
            advanced_config=glide.AdvancedGlideClientConfiguration(tls_config=glide_tls(localhost_certs)))
        client = await glide.GlideClient.create(cfg)
        try:
            assert await client.set("g", "2") == "OK"
            assert await client.get("g") == b"2"
        finally:
            await client.close()
    asyncio.run(main())
    assert source.client().get("g") == b"2"
    assert p.keys(0) == {b"t", b"g"}


def test_cluster_tls_clients_follow_the_announced_host(make_cluster, make_proxy, localhost_certs) -> None:
    import glide
    cluster = make_cluster(primaries=3)
    p = make_proxy(cluster.endpoint(), client_tls=server_context(localhost_certs), announce_host=HOST)
    # valkey-py's cluster client verifies the CA but never the host name (it does not pass
    # ssl_check_hostname on to its node connections, and turns "localhost" into 127.0.0.1); GLIDE,
    # below, verifies both.
    rc = ValkeyCluster(host=HOST, port=p.port, **verified(localhost_certs))
    assert [n.port for n in rc.get_nodes()] == [p.port]
    keys = [f"tls:{i}" for i in range(40)]
    for k in keys:
        assert rc.set(k, k)
    assert [rc.get(k) for k in keys] == [k.encode() for k in keys]
    # A TLS-only node reports its TLS port as such.
    shard_node = rc.execute_command("CLUSTER", "SHARDS", target_nodes=rc.get_nodes()[0])[0]
    fields = _fields(shard_node)
    assert fields[b"tls-port"] == p.port and b"port" not in fields

    async def main() -> None:
        cfg = glide.GlideClusterClientConfiguration(
            [glide.NodeAddress(HOST, p.port)], use_tls=True, request_timeout=5000,
            advanced_config=glide.AdvancedGlideClusterClientConfiguration(tls_config=glide_tls(localhost_certs)))
        client = await glide.GlideClusterClient.create(cfg)
        try:
            for k in keys[:10]:
                assert await client.set(f"g{k}", "v") == "OK"
            assert [await client.get(f"g{k}") for k in keys[:10]] == [b"v"] * 10
        finally:
            await client.close()
    asyncio.run(main())
    direct = cluster.cluster_client()
    assert all(direct.get(k) == k.encode() for k in keys)
    assert all(direct.get(f"g{k}") == b"v" for k in keys[:10])


def test_a_client_verifies_the_host_cluster_slots_names(make_cluster, make_proxy, localhost_certs) -> None:
    """What the announced host is for: a cluster client connects to, and verifies, the host CLUSTER
    SLOTS names. Without an announced host that is the address the client connected to (127.0.0.1),
    which the certificate does not name; with it, it is the name. (GLIDE happens to keep the seed's
    name for a one-node cluster at the seed's address, so the test follows SLOTS itself.)"""
    cluster = make_cluster(primaries=2)
    ctx = server_context(localhost_certs)
    for announce, ok in ((None, False), (HOST, True)):
        p = make_proxy(cluster.endpoint(), client_tls=ctx, announce_host=announce)
        seed = valkey.Valkey(host=HOST, port=p.port, **verified(localhost_certs))
        host, port = seed.execute_command("CLUSTER", "SLOTS")[0][2][:2]
        node = valkey.Valkey(host=host.decode(), port=port, **verified(localhost_certs))
        if ok:
            assert node.set("slots-host", "1") and cluster.cluster_client().get("slots-host") == b"1"
        else:
            with pytest.raises(valkey.ConnectionError, match="certificate verify failed"):
                node.ping()


def _fields(node: Any) -> dict[bytes, Any]:
    """A CLUSTER SHARDS node as a dict (RESP2 gives a flat list, valkey-py may give a dict)."""
    if isinstance(node, dict):
        nodes = node.get(b"nodes") or node.get("nodes")
    else:
        shard = dict(zip(node[::2], node[1::2], strict=True))
        nodes = shard[b"nodes"]
    first = nodes[0]
    if isinstance(first, dict):
        return {k if isinstance(k, bytes) else k.encode(): v for k, v in first.items()}
    return dict(zip(first[::2], first[1::2], strict=True))


def test_announced_host_in_slots_shards_and_nodes(make_cluster, make_proxy) -> None:
    """As a node with cluster-announce-hostname and cluster-preferred-endpoint-type hostname answers
    (checked against valkey-server 9.1): SLOTS names the host, the IP in the entry's metadata; SHARDS
    has ip, endpoint and hostname; NODES appends ``,host`` to the address."""
    cluster = make_cluster(primaries=2)
    name = "proxy.shop.svc"
    p = make_proxy(cluster.endpoint(), announce_host=name, announce_port=7000)
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    node_id = p.proxy.node_id.encode()
    slots = c.execute_command("CLUSTER", "SLOTS")
    assert slots == [[0, 16383, [name.encode(), 7000, node_id, [b"ip", b"127.0.0.1"]]]]
    r3 = valkey.Valkey(port=p.port, socket_timeout=10, protocol=3)
    assert r3.execute_command("CLUSTER", "SLOTS")[0][2][3] == {b"ip": b"127.0.0.1"}
    shards = c.execute_command("CLUSTER", "SHARDS")
    fields = _fields(shards[0])
    assert (fields[b"ip"], fields[b"endpoint"], fields[b"hostname"], fields[b"port"]) == \
        (b"127.0.0.1", name.encode(), name.encode(), 7000)
    raw = Raw(p.port)
    line = raw("CLUSTER", "NODES")
    raw.close()
    assert line == f"{p.proxy.node_id} 127.0.0.1:7000@0,{name} myself,master - 0 0 1 connected 0-16383\n".encode()
    # Without an announced host: the address the client connected to, and no hostname.
    plain = make_proxy(cluster.endpoint())
    pc = valkey.Valkey(port=plain.port, socket_timeout=10)
    assert pc.execute_command("CLUSTER", "SLOTS")[0][2][:2] == [b"127.0.0.1", plain.port]
    assert b"hostname" not in _fields(pc.execute_command("CLUSTER", "SHARDS")[0])
