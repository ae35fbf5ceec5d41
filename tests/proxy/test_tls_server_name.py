"""spec.*.tls.serverName (Endpoint.server_name, ``?servername=`` in a URL) is the name TLS sends and
verifies: a server whose certificate names only ``cache.internal``, reached at 127.0.0.1, is accepted
with it and refused without it — by the engine's connections and by the proxy's upstream ones."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil

import pytest
import valkey
from certs import certs_for

from durablecache.errors import ConnectError
from durablecache.resp import Connection
from durablecache.testing.localvalkey import LocalServer
from durablecache.urls import Endpoint, parse_url

NAME = "cache.internal"


@pytest.fixture(scope="module")
def named_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA and a server certificate for cache.internal only (no IP address in it)."""
    return certs_for(tmp_path_factory.mktemp("tls-named"), NAME)


@pytest.fixture
def named_server(make_server, named_certs: dict[str, str]) -> LocalServer:  # type: ignore[no-untyped-def]
    binary = shutil.which("redis-server")
    if not binary:
        pytest.fail("redis-server is required for the TLS tests (scripts/system-deps.sh installs it)")
    return make_server(binary=binary, tls=named_certs, password="tls-secret")  # type: ignore[no-any-return]


async def ping(endpoint: Endpoint) -> object:
    conn = await Connection.open(endpoint)
    try:
        return (await conn.pipeline([["PING"]]))[0]
    finally:
        await conn.close()


def test_the_engine_verifies_the_server_name_not_the_address(named_server: LocalServer) -> None:
    by_address = named_server.endpoint()
    assert by_address.tls and by_address.host == "127.0.0.1"
    with pytest.raises(ConnectError, match="certificate verify failed"):
        asyncio.run(ping(by_address))
    named = dataclasses.replace(by_address, server_name=NAME)
    assert asyncio.run(ping(named)) in ("PONG", b"PONG")
    # The name survives the URL handed to a proxy child process.
    assert parse_url(named.to_url()).server_name == NAME


def test_the_proxy_reaches_its_upstream_by_the_server_name(named_server: LocalServer, make_proxy) -> None:  # type: ignore[no-untyped-def]
    p = make_proxy(dataclasses.replace(named_server.endpoint(), server_name=NAME))
    c = valkey.Valkey(host="127.0.0.1", port=p.port, socket_timeout=10, password="tls-secret")
    assert c.set("k", "v") and c.get("k") == b"v"
