"""TLS on the fleet's internal channels (docs/ha.md, "Transport"): a coordinator and its joined
`durablecache proxy --join` processes given the fleet's certificate (--fleet-tls-cert/--fleet-tls-key)
carry a migration to Complete with nothing lost; the join seen on the wire carries no credential; a
peer without the certificate is refused on the mark channel and on the admin API, in either
direction; a proxy and a coordinator that disagree on the transport fail with one clear line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import libvalkey
import pytest
from test_fleet import TOKEN, ProxyProc, Run, run_fleet  # tests/proxy is on sys.path (pytest's rootdir import)

from durablecache import logs
from durablecache.errors import ConnectError
from durablecache.fleet import Fleet, Member
from durablecache.fleettls import FleetTLS, make_certificate
from durablecache.k8s.runner import LocalProcessRunner
from durablecache.testing.waiting import wait_for_async
from durablecache.testing.workload import seed

pytestmark = pytest.mark.timeout(180)
PASSWORD = "upstream-pass-7f3a91"


def write_certificate(d: Path, name: str) -> FleetTLS:
    """A fleet certificate as the operator makes one, in owner-only files."""
    cert, key = make_certificate(f"test fleet {name}")
    paths = []
    for suffix, text in (("crt", cert), ("key", key)):
        path = d / f"{name}.{suffix}"
        path.write_text(text)
        path.chmod(0o600)
        paths.append(str(path))
    return FleetTLS(paths[0], paths[1])


@pytest.fixture
def fleet_tls(tmp_path: Path) -> FleetTLS:
    return write_certificate(tmp_path, "fleet")


@pytest.fixture
def other_tls(tmp_path: Path) -> FleetTLS:
    """Another self-signed certificate: what a stranger on the pod network could make."""
    return write_certificate(tmp_path, "other")


def flags(tls: FleetTLS) -> list[str]:
    return ["--fleet-tls-cert", tls.cert, "--fleet-tls-key", tls.key]


class Relay:
    """A TCP relay in front of the coordinator that keeps every byte it passes on, both ways: what
    anyone on the network between a proxy and its coordinator could read."""

    def __init__(self, to_port: int):
        self.to_port = to_port
        self.seen = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.to_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                self.seen += data
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()


def test_a_tls_fleet_carries_a_migration_to_complete_with_nothing_lost(source, target, tmp_path, fleet_tls):
    """Two proxy processes join over TLS (one through a relay that records the wire), stream their
    marks under write load, and are driven through the cutover over HTTPS: Complete, no acknowledged
    write missing on the target. The relay saw the marks go by, but not one key name in the clear."""
    async def body(r: Run) -> None:
        with contextlib.closing(source.client()) as client:
            seed(client, 20000)        # closed: the RouteIn gate waits for every other client to leave
        r.task = asyncio.create_task(r.m.run())
        assert (await r.wait(lambda e: e["event"] == "coordinator"))["tls"] is True
        relay = await Relay(r.fleet.port).start()
        try:
            r.load_through(await r.add_proxy("p1", relay.port), "load1-key")
            r.load_through(await r.add_proxy("p2"), "load2-key")
            await r.sync_reached()
            assert {m.admin_base.split(":")[0] for m in r.fleet.members.values()} == {"https"}
            await r.finish()
            assert r.loads[0].acked > 100
            # The marks of every write through p1 crossed the relay; none is readable there.
            assert len(relay.seen) > 20 * r.loads[0].acked
            assert b"load1-key" not in relay.seen and b"MARK" not in relay.seen and b"HELLO-FLEET" not in relay.seen
        finally:
            relay.stop()
    run_fleet(source, target, tmp_path, body, tls=fleet_tls)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_the_join_on_the_wire_carries_no_credentials(make_server, tmp_path, fleet_tls, tls):
    """The state a proxy receives names the upstream with its password. Over plain TCP anyone between
    the proxy and its coordinator reads it (the check's own control); over the fleet's TLS neither the
    password nor the fleet's token is on the wire."""
    source = make_server(password=PASSWORD)
    token_file = tmp_path / "join.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)

    async def main() -> None:
        fleet = Fleet(TOKEN, tls=fleet_tls if tls else None)
        await fleet.start(source.endpoint(), lambda _db, _keys: None, lambda _why: None)
        relay = await Relay(fleet.port).start()
        p = await ProxyProc.join(relay.port, token_file, "p1", flags(fleet_tls) if tls else [])
        try:
            await wait_for_async("the proxy to join", lambda: fleet.members, 30)
            (member,) = fleet.members.values()
            await member.freeze(5.0)            # an instruction over the admin API works as well
            await member.unfreeze()
            wire = bytes(relay.seen)
            assert b"HELLO-FLEET" in wire or tls
            assert (PASSWORD.encode() in wire) is not tls
            assert (TOKEN.encode() in wire) is not tls
        finally:
            relay.stop()
            await fleet.stop()
            await p.stop()
    asyncio.run(main())


async def _exit_of(p: ProxyProc, timeout: float = 30.0) -> tuple[int, str]:
    code = await asyncio.wait_for(p.proc.wait(), timeout)
    return code, p.log.read_text()


@pytest.mark.parametrize("case", ["plain proxy, tls coordinator", "tls proxy, plain coordinator",
                                  "another certificate"])
def test_a_proxy_and_a_coordinator_that_disagree_fail_at_once_with_one_clear_line(
        source, tmp_path, fleet_tls, other_tls, case):
    """No join, no retrying for the two minutes a first join may take, no traceback: exit 2 and the
    reason (the proxy's stderr), while the coordinator takes no member."""
    token_file = tmp_path / "join.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    coordinator_tls, proxy_tls = {"plain proxy, tls coordinator": (fleet_tls, None),
                                  "tls proxy, plain coordinator": (None, fleet_tls),
                                  "another certificate": (fleet_tls, other_tls)}[case]

    async def main() -> None:
        fleet = Fleet(TOKEN, tls=coordinator_tls)
        await fleet.start(source.endpoint(), lambda _db, _keys: None, lambda _why: None)
        p = await ProxyProc.join(fleet.port, token_file, "p1", flags(proxy_tls) if proxy_tls else [])
        try:
            code, err = await _exit_of(p)
        finally:
            await fleet.stop()
            await p.stop()
        assert code == 2, err
        assert "Traceback" not in err
        (line,) = [x for x in err.splitlines() if x.startswith("durablecache proxy: error:")]
        assert f"the coordinator at 127.0.0.1:{fleet.port}" in line and "--fleet-tls-cert" in line
        assert ("refused TLS" in line) if proxy_tls else ("did not answer in plain TCP" in line)
        assert not fleet.members
    asyncio.run(main())


async def _hello(port: int, tls: ssl.SSLContext | None) -> bytes:
    """HELLO-FLEET with the right token, as a peer with ``tls`` (None: plain TCP): what it receives
    before the connection ends (a refused handshake counts as nothing)."""
    got = b""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=tls), 10)
        writer.write(libvalkey.pack_command((b"HELLO-FLEET", TOKEN.encode(), b"stranger", b"0")))
        while data := await asyncio.wait_for(reader.read(1 << 16), 10):
            got += data
        writer.close()
    except (OSError, ssl.SSLError):
        pass
    return got


def _client_context(trust: FleetTLS, present: FleetTLS | None) -> ssl.SSLContext:
    """A client that trusts the fleet's certificate and presents ``present``'s (None: no certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=trust.cert)
    if present is not None:
        ctx.load_cert_chain(present.cert, present.key)
    return ctx


def test_a_peer_without_the_certificate_is_refused_on_the_mark_channel(source, fleet_tls, other_tls, capsys):
    """Knowing the token is not enough: a peer that speaks plain TCP, or TLS without the fleet's
    certificate (none, or another self-signed one) never gets the state, and the coordinator logs each
    refusal with the peer's address — not a TCP probe that connects and leaves (the pod's readiness
    check); the fleet's own certificate gets the state."""
    logs.configure(level="warning")

    async def main() -> None:
        fleet = Fleet(TOKEN, tls=fleet_tls)
        await fleet.start(source.endpoint(), lambda _db, _keys: None, lambda _why: None)
        try:
            _, probe = await asyncio.open_connection("127.0.0.1", fleet.port)
            probe.close()
            for tls in (None, _client_context(fleet_tls, None), _client_context(fleet_tls, other_tls)):
                assert await _hello(fleet.port, tls) == b""
            # The control: with the fleet's certificate, the same greeting gets the state.
            reader, writer = await asyncio.open_connection("127.0.0.1", fleet.port, ssl=fleet_tls.client)
            writer.write(libvalkey.pack_command((b"HELLO-FLEET", TOKEN.encode(), b"member", b"0")))
            state = await asyncio.wait_for(reader.readuntil(b"}\r\n"), 10)
            assert b'"upstream"' in state
            writer.close()
        finally:
            await fleet.stop()
    asyncio.run(main())
    refusals = [line for line in capsys.readouterr().err.splitlines() if "marks.tls_refused" in line]
    assert len(refusals) == 3, refusals
    assert all("peer='127.0.0.1:" in line and TOKEN not in line for line in refusals)


async def _admin_post(url: str, tls: ssl.SSLContext | None) -> int | str:
    """POST with the fleet's token: the status, or the error a refused connection ends in."""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls if tls else False)) as s, \
                s.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=aiohttp.ClientTimeout(total=10)) as r:
            return r.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


def test_a_peer_without_the_certificate_is_refused_on_the_admin_api(source, tmp_path, fleet_tls, other_tls):
    """A joined proxy's admin API refuses a client with the token but without the fleet's certificate
    (plain HTTP, HTTPS with none, HTTPS with another), and nothing it asked is done. The other way
    round, the coordinator refuses an admin API that presents another certificate."""
    token_file = tmp_path / "join.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)

    async def main() -> None:
        fleet = Fleet(TOKEN, tls=fleet_tls)
        strangers = Fleet(TOKEN, tls=other_tls)      # a fleet with another certificate, and its proxy
        for f in (fleet, strangers):
            await f.start(source.endpoint(), lambda _db, _keys: None, lambda _why: None)
        p = await ProxyProc.join(fleet.port, token_file, "p1", flags(fleet_tls))
        q = await ProxyProc.join(strangers.port, token_file, "q1", flags(other_tls))
        try:
            await wait_for_async("both proxies to join", lambda: fleet.members and strangers.members, 30)
            (member,) = fleet.members.values()
            (stranger,) = strangers.members.values()
            address = member.admin_base.removeprefix("https://")
            refused = [await _admin_post(f"http://{address}/freeze?timeout=1", None)]
            for tls in (_client_context(fleet_tls, None), _client_context(fleet_tls, other_tls)):
                refused.append(await _admin_post(f"https://{address}/freeze?timeout=1", tls))
            assert all(isinstance(x, str) for x in refused), refused    # no HTTP status: no request served
            healthz: Any = await member._admin("GET", "/healthz")       # the coordinator's own client
            assert healthz["ok"] is True and healthz["frozen"] is False
            # The coordinator's client, pointed at the stranger's admin API, refuses it.
            fooled = Member("q1@x", "q1", stranger.address, stranger.admin_base.removeprefix("https://"), TOKEN, 0,
                            fleet_tls.client)
            try:
                with pytest.raises(ConnectError, match="certificate verify failed"):
                    await fooled.freeze(1.0)
            finally:
                await fooled.close_admin()
            assert (await stranger._admin("GET", "/healthz"))["frozen"] is False
        finally:
            for f in (fleet, strangers):
                await f.stop()
            for x in (p, q):
                await x.stop()
    asyncio.run(main())


def test_the_flags_go_together_and_with_a_fleet(tmp_path, fleet_tls):
    cli = [sys.executable, "-m", "durablecache.cli"]

    def error(*args: str) -> str:
        res = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        return res.stderr

    token = tmp_path / "join.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    join = ["proxy", "--join", "127.0.0.1:1", "--admin", "127.0.0.1:0", "--join-token-file", str(token)]
    assert "go with --join" in error("proxy", "--upstream", "valkey://127.0.0.1:1", *flags(fleet_tls))
    assert "go together" in error(*join, "--fleet-tls-cert", fleet_tls.cert)
    (tmp_path / "bad.crt").write_text("not a certificate")
    assert "cannot load --fleet-tls-cert" in error(*join, "--fleet-tls-cert", str(tmp_path / "bad.crt"),
                                                   "--fleet-tls-key", fleet_tls.key)
    assert "goes with --coordinator-listen" in error(
        "migrate", "--source", "valkey://127.0.0.1:1", "--target", "valkey://127.0.0.1:2", "--listen", "127.0.0.1:1",
        *flags(fleet_tls))


def test_the_local_runner_makes_the_certificate_once_in_owner_only_files(tmp_path):
    obj = {"metadata": {"namespace": "ns", "name": "dc"}}
    runner = LocalProcessRunner(tmp_path, env={})
    cert, key = runner.fleet_tls_files(obj)
    assert runner.fleet_tls_files(obj) == (cert, key)
    first = Path(cert).read_text()
    assert LocalProcessRunner(tmp_path, env={}).fleet_tls_files(obj) == (cert, key)   # a restarted operator
    assert Path(cert).read_text() == first
    for path in (cert, key):
        assert os.stat(path).st_mode & 0o777 == 0o600
    FleetTLS(cert, key)                # the key is the certificate's
    Path(cert).unlink()               # one of the two lost: both are made again, as a pair
    cert2, key2 = runner.fleet_tls_files(obj)
    assert Path(cert2).read_text() != first
    FleetTLS(cert2, key2)
