"""The control API (`durablecache migrate --control`) accepts only `Authorization: Bearer <token>`, as the
proxy's admin API does; a token file others may read is used with a warning."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from durablecache.commands._common import read_token
from durablecache.control import ControlServer
from durablecache.errors import UsageError
from durablecache.migration import Migration, MigrationOptions, Phase
from durablecache.urls import Endpoint

TOKEN = "c0ffee-token"


async def _no_proxies(*_: Any) -> list[Any]:
    raise AssertionError("the control API never starts the migration")


def sync_migration() -> Migration:
    """A real Migration, not started, whose saved state says Sync: what the control API acts on."""
    m = Migration(Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2), MigrationOptions(), _no_proxies)
    m.state["phase"] = Phase.SYNC.value
    return m


def request(port: int, path: str, authorization: str | None, method: str = "GET") -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": authorization} if authorization is not None else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_only_the_bearer_scheme_with_the_right_token_is_accepted() -> None:
    async def scenario() -> list[tuple[str | None, int]]:
        migration = sync_migration()
        server = ControlServer(migration, TOKEN, "127.0.0.1", 0)  # type: ignore[arg-type]
        await server.start()
        try:
            results = []
            for auth in (None, TOKEN, f"Token {TOKEN}", f"Bearer {TOKEN}x", f"Bearer{TOKEN}", "Bearer ",
                         f"Bearer {TOKEN}", f"bearer {TOKEN}"):
                status, body = await asyncio.to_thread(request, server.port, "/status", auth)
                if status == 401:
                    assert "Bearer <token>" in body["error"] and TOKEN not in json.dumps(body)
                results.append((auth, status))
            # The refused requests changed nothing; the accepted one approves.
            assert not migration.approved.is_set()
            status, body = await asyncio.to_thread(request, server.port, "/approve", TOKEN, "POST")
            assert status == 401 and not migration.approved.is_set()
            status, body = await asyncio.to_thread(request, server.port, "/approve", f"Bearer {TOKEN}", "POST")
            assert (status, body["approved"]) == (200, True) and migration.approved.is_set()
            return results
        finally:
            await server.stop()

    results = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert results == [(None, 401), (TOKEN, 401), (f"Token {TOKEN}", 401), (f"Bearer {TOKEN}x", 401),
                       (f"Bearer{TOKEN}", 401), ("Bearer ", 401), (f"Bearer {TOKEN}", 200), (f"bearer {TOKEN}", 200)]


def test_a_token_file_others_can_read_is_used_with_a_warning(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from durablecache import logs

    logs.configure(level="warning")
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    path.chmod(0o600)
    assert read_token(str(path), "--control") == TOKEN
    assert capsys.readouterr().err == ""
    path.chmod(0o644)
    assert read_token(str(path), "--control") == TOKEN
    err = capsys.readouterr().err
    assert "can be read by other users (mode 0644); chmod 600 it" in err and str(path) in err
    assert TOKEN not in err
    path.write_text("\n")
    with pytest.raises(UsageError, match="is empty"):
        read_token(str(path), "--control")
