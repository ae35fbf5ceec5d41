"""`durablecache proxy` as a process: marks over the wire to a MarkServer, on_lost on kill -9, admin API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import valkey

from durablecache.ports import free_port
from durablecache.proxy.marks import MarkServer, RemoteMarks
from durablecache.testing.waiting import wait_for_async, wait_listening

pytestmark = pytest.mark.timeout(90)
DURABLECACHE = [sys.executable, "-m", "durablecache.cli"]


async def _in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


def test_remote_marks_round_trip_and_bad_token():
    async def main() -> None:
        got: list[tuple[int, bytes]] = []
        lost: list[str] = []

        async def on_marks(db: int, keys: list[bytes]) -> None:
            got.extend((db, k) for k in keys)
        server = MarkServer(on_marks, "tok", on_lost=lost.append)
        await server.start()
        remote = RemoteMarks("127.0.0.1", server.port, "tok", name="p1")
        await asyncio.gather(remote(0, [b"a", b"b"]), remote(3, [b"c"]))
        assert sorted(got) == [(0, b"a"), (0, b"b"), (3, b"c")]
        await remote.close()
        await wait_for_async("the server to see the proxy leave", lambda: not server.peers, 5)
        assert lost == []                       # a clean goodbye is not a loss
        from durablecache.errors import ConnectError
        with pytest.raises(ConnectError, match="refused"):
            await RemoteMarks("127.0.0.1", server.port, "wrong", retry_for=0.5).connect()
        await server.stop()
    asyncio.run(main())


def test_proxy_process_delivers_marks_and_its_death_is_reported(source, tmp_path):
    token_file = tmp_path / "marks.token"
    token_file.write_text("marks-secret\n")
    admin_token = tmp_path / "admin.token"
    admin_token.write_text("admin-secret\n")

    async def main() -> None:
        got: list[tuple[int, bytes]] = []
        lost: list[str] = []

        async def on_marks(db: int, keys: list[bytes]) -> None:
            got.extend((db, k) for k in keys)
        server = MarkServer(on_marks, "marks-secret", on_lost=lost.append)
        await server.start()
        port, admin_port = free_port(), free_port()
        proc = subprocess.Popen(
            [*DURABLECACHE, "proxy", "--upstream", source.url(), "--listen", f"127.0.0.1:{port}",
             "--marks-to", f"127.0.0.1:{server.port}", "--marks-token-file", str(token_file),
             "--admin", f"127.0.0.1:{admin_port}", "--admin-token-file", str(admin_token), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
        try:
            await asyncio.to_thread(wait_listening, port, proc, 20)
            await asyncio.to_thread(wait_listening, admin_port, proc, 20)
            c = valkey.Valkey(port=port, socket_timeout=10)
            await asyncio.to_thread(c.set, "remote-key", "1")
            # Answered at once; its mark is streamed, and the FREEZE in _admin_checks returns only
            # once the syncer acknowledged it.
            await asyncio.to_thread(_admin_checks, admin_port, c, source.url())
            assert (0, b"remote-key") in got
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            await wait_for_async("the killed proxy reported lost", lambda: lost, 5)
            assert len(lost) == 1 and "durablecache-proxy" in lost[0]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            await server.stop()
    asyncio.run(main())


def _admin_checks(admin_port: int, c: valkey.Valkey, upstream: str) -> None:
    base = f"http://127.0.0.1:{admin_port}"

    def call(method: str, path: str, token: str | None = "admin-secret", body: dict | None = None):
        req = urllib.request.Request(base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    assert call("GET", "/healthz", token=None)[0] == 401
    assert call("GET", "/stats", token="nope")[0] == 401
    assert call("POST", "/freeze?timeout=5", token=None)[0] == 401
    status, stats = call("GET", "/stats")
    assert status == 200 and stats["writes"] >= 1 and stats["clients"] >= 1
    assert call("POST", "/flip", body={"upstream": "valkey://127.0.0.1:1"})[0] == 409   # not frozen
    assert call("POST", "/prepare", body={"upstream": "not a url"})[0] == 400
    status, body = call("POST", "/prepare", body={"upstream": "valkey://127.0.0.1:1"})
    assert status == 502 and body["error"]                                      # nothing listens there
    status, body = call("POST", "/prepare", body={"upstream": upstream})
    assert status == 200 and body["upstream"].startswith("valkey://127.0.0.1:")
    status, body = call("POST", "/freeze?timeout=5")
    assert status == 200 and body["quiesced"]
    assert call("GET", "/healthz")[1]["frozen"] is True
    assert c.get("remote-key") == b"1"           # reads go on while frozen
    assert call("POST", "/unfreeze")[0] == 200
    assert c.set("after-unfreeze", "1")


def test_cli_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([*DURABLECACHE, "proxy", "--upstream", "valkey://127.0.0.1:1", "--listen", "nope"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--listen must be HOST:PORT" in proc.stderr
    proc = subprocess.run([*DURABLECACHE, "proxy", "--upstream", "valkey://127.0.0.1:1",
                           "--admin", "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "token file" in proc.stderr
    Path(tmp_path, "x").write_text("")
