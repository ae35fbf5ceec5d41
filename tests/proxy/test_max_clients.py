"""--max-clients: a client over the limit gets the server's own error and is closed; the stats count
connections and refusals; a freed slot is taken by the next client."""

from __future__ import annotations

import socket
import ssl

import pytest
import valkey

from durablecache.testing.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def refusal(port: int, tls: ssl.SSLContext | None = None) -> bytes:
    """Everything a new connection receives before the other side closes it (bounded)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
    data = b""
    with sock:
        while chunk := sock.recv(4096):
            data += chunk
    return data


def test_the_server_s_own_error_text(make_server) -> None:
    """What the proxy imitates, from a real server: maxclients reached."""
    server = make_server()
    c = server.client()
    c.config_set("maxclients", 1)
    assert refusal(server.port) == b"-ERR max number of clients reached\r\n"


def test_a_client_over_the_limit_is_refused_and_a_freed_slot_is_taken(source, make_proxy) -> None:
    p = make_proxy(source.endpoint(), max_clients=2)
    a, b = (valkey.Valkey(port=p.port, socket_timeout=10, single_connection_client=True) for _ in range(2))
    assert a.ping() and b.set("k", "1")
    assert refusal(p.port) == b"-ERR max number of clients reached\r\n"
    with pytest.raises(valkey.ConnectionError, match="max number of clients reached"):
        valkey.Valkey(port=p.port, socket_timeout=10).ping()
    stats = p.call(p.proxy.stats)
    assert (stats["clients"], stats["max_clients"], stats["clients_refused"]) == (2, 2, 2)
    assert stats["connections_total"] == 4
    assert p.keys(0) == {b"k"}             # the refused clients never reached the upstream
    a.close()
    wait_for("the closed client to leave", lambda: p.call(p.proxy.stats)["clients"] == 1, 10)
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    assert c.get("k") == b"1"
    assert p.call(p.proxy.stats)["clients_refused"] == 2


def test_a_tls_client_over_the_limit_gets_the_error_over_tls(source, make_proxy, tls_certs) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_certs["cert"], tls_certs["key"])
    p = make_proxy(source.endpoint(), client_tls=ctx, max_clients=1)
    first = valkey.Valkey(port=p.port, ssl=True, ssl_ca_certs=tls_certs["ca"], socket_timeout=10)
    assert first.ping()
    client_ctx = ssl.create_default_context(cafile=tls_certs["ca"])
    assert refusal(p.port, client_ctx) == b"-ERR max number of clients reached\r\n"
    assert p.call(p.proxy.stats)["clients_refused"] == 1
