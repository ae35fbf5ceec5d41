"""The operator's worker starts its proxies as spec.proxy says (commands/worker.py, proxy_starter): one
in its own process, or N supervised children sharing the port; TLS from the proxy's certificate, the
client limit and the announced host reach every one of them."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest
import valkey

from durablecache.commands.worker import proxy_clients, proxy_starter
from durablecache.k8s.spec import ProxySpec
from durablecache.ports import free_port
from durablecache.proxyhandles import LocalProxy, SubprocessProxy

pytestmark = pytest.mark.timeout(120)


def worker_args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"proxy_mode": "inprocess", "announce": None, "tls_cert": None, "tls_key": None,
                                 **kw})


async def no_marks(db: int, keys: list[bytes]) -> None:
    return None


def tls_client(port: int, certs: dict[str, str]) -> valkey.Valkey:
    return valkey.Valkey(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=certs["ca"], ssl_check_hostname=True,
                         ssl_cert_reqs="required", socket_timeout=10, single_connection_client=True)


def test_one_proxy_in_the_worker_serves_tls_with_its_client_limit(source, tls_certs) -> None:
    port = free_port()

    async def main() -> None:
        starter, owned = proxy_starter(ProxySpec(max_clients=1), worker_args(announce="cache.shop.svc"),
                                       "127.0.0.1", port, tls_certs["cert"], tls_certs["key"], lambda e: None)
        assert owned == []
        (handle,) = await starter(source.endpoint(), no_marks, lambda reason: None)
        assert isinstance(handle, LocalProxy)
        proxy = handle.proxy
        try:
            assert (proxy.max_clients, proxy.announce_host, proxy.serves_tls) == (1, "cache.shop.svc", True)
            # Clients in threads: they connect synchronously, and the proxy runs on this event loop.
            first = await asyncio.to_thread(tls_client, port, tls_certs)
            assert await asyncio.to_thread(first.set, "w", "1")
            with pytest.raises(valkey.ConnectionError, match="max number of clients reached"):
                await asyncio.to_thread(lambda: tls_client(port, tls_certs).ping())
            with pytest.raises(valkey.ConnectionError):      # plain TCP to the TLS listener
                await asyncio.to_thread(valkey.Valkey(port=port, socket_timeout=5).ping)
            # What the worker reports in status.proxyClients (and the operator exports as metrics).
            assert await proxy_clients([handle]) == {"clients": 1, "connectionsTotal": 3, "refused": 1}
            first.close()
        finally:
            await handle.stop()
    asyncio.run(main())
    assert source.client().get("w") == b"1"


def test_several_processes_get_every_setting(source, tls_certs) -> None:
    port = free_port()

    async def main() -> None:
        starter, owned = proxy_starter(ProxySpec(processes=2, max_clients=7), worker_args(announce="cache.shop.svc"),
                                       "127.0.0.1", port, tls_certs["cert"], tls_certs["key"], lambda e: None)
        try:
            handles = await starter(source.endpoint(), no_marks, lambda reason: None)
            assert len(handles) == 2 and all(isinstance(h, SubprocessProxy) for h in handles)
            for h in handles:
                assert isinstance(h, SubprocessProxy)
                stats = await h._admin("GET", "/stats")
                assert stats["max_clients"] == 7
                args = h.extra_args
                assert args[args.index("--announce") + 1] == "cache.shop.svc"
                assert args[args.index("--tls-cert") + 1] == tls_certs["cert"]
                assert "--reuse-port" in args
            c = await asyncio.to_thread(tls_client, port, tls_certs)
            assert await asyncio.to_thread(c.set, "k", "v")
            counts = await proxy_clients(handles)
            assert counts is not None and (counts["clients"], counts["refused"]) == (1, 0)
            c.close()
        finally:
            for thing in owned:
                await thing.stop()
    asyncio.run(main())
    assert source.client().get("k") == b"v"


def test_the_operator_exports_the_proxies_client_counts() -> None:
    from durablecache.k8s.metrics import Metrics
    m = Metrics()
    obj = {"metadata": {"namespace": "shop", "name": "sessions"},
           "status": {"phase": "Sync", "proxyClients": {"clients": 12, "connectionsTotal": 40, "refused": 3}}}
    m.observe(obj)

    def value(name: str) -> float | None:
        return m.registry.get_sample_value(name, {"namespace": "shop", "name": "sessions"})
    assert (value("durablecache_proxy_clients"), value("durablecache_proxy_connections_accepted"),
            value("durablecache_proxy_clients_refused")) == (12, 40, 3)
    m.forget("shop", "sessions")
    assert value("durablecache_proxy_clients") is None
