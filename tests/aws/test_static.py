"""The static provider: given endpoints, nothing created or deleted, honest about what it cannot check."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from durablecache.errors import UsageError
from durablecache.providers import StaticProvider, TargetSpec
from durablecache.resp import Connection
from durablecache.testing.localvalkey import LocalServer
from durablecache.urls import parse_url

SPEC = TargetSpec(replication_group_id="durable", migration_id="m1", durability="sync",
                  auth_token="from-the-secret-0123")


def test_endpoints_carry_the_secret_and_reach_the_server(make_server: Callable[..., LocalServer]) -> None:
    server = make_server(password="from-the-secret-0123")
    provider = StaticProvider(parse_url("valkey://127.0.0.1:1"), [parse_url(f"valkey://127.0.0.1:{server.port}")])
    info = provider.ensure_target(SPEC)
    assert (info.status, info.created) == ("available", False)
    assert provider.wait_ready(SPEC) == info
    (endpoint,) = provider.endpoints(SPEC)
    assert endpoint.password == "from-the-secret-0123"

    async def ping() -> object:
        conn = await Connection.open(endpoint)
        try:
            return await conn.call("PING")
        finally:
            await conn.close()

    assert asyncio.run(ping()) in (b"PONG", "PONG")


def test_preflight_warns_it_cannot_check_durability_and_refuses_source_as_target() -> None:
    same = StaticProvider(parse_url("valkey://127.0.0.1:7000"), [parse_url("valkey://127.0.0.1:7000")])
    result = same.preflight(SPEC)
    assert [v.field for v in result.violations] == ["target.endpoints"]
    assert [w.field for w in result.warnings] == ["target.provider"]
    other = StaticProvider(parse_url("valkey://127.0.0.1:7000"), [parse_url("valkeys://10.0.0.5:6379")])
    assert other.preflight(SPEC).ok


def test_static_creates_snapshots_and_deletes_nothing() -> None:
    provider = StaticProvider(parse_url("valkey://127.0.0.1:7000"), [parse_url("valkey://127.0.0.1:7001")])
    assert provider.delete_source("Retain", "m1", migration_completed=True).action == "retained"
    assert provider.delete_target(SPEC, "Retain", reached_flip=False).action == "retained"
    for call in (lambda: provider.delete_source("Delete", "m1", migration_completed=True),
                 lambda: provider.delete_target(SPEC, "Delete", reached_flip=False),
                 lambda: provider.snapshot_source("s", "m1", route_in_active=True),
                 lambda: provider.set_durability(SPEC)):
        with pytest.raises(UsageError):
            call()
    with pytest.raises(UsageError, match="at least one target"):
        StaticProvider(parse_url("valkey://127.0.0.1:7000"), [])
