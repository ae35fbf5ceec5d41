"""ElastiCache IAM authentication of DurableCache's own connections (operator/durablecache/iamauth.py).

Real servers: the test mints a token with fixed credentials and a frozen clock, makes that exact token
an ACL user's password on a real valkey-server, and the engine's connection must get in with it, and
authenticate again, with a new token, when its re-authentication interval is up.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from typing import Any
from urllib.parse import parse_qs

import botocore.auth
import pytest
from botocore.credentials import Credentials
from botocore.hooks import HierarchicalEmitter
from botocore.model import ServiceId
from botocore.signers import RequestSigner

from durablecache.errors import ConnectError, UsageError
from durablecache.iamauth import REAUTH_AFTER, IamAuth, mint_token
from durablecache.resp import Connection
from durablecache.testing.waiting import wait_for_async
from durablecache.urls import Endpoint, parse_url

CREDS = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "session-token")
T1 = datetime.datetime(2026, 1, 2, 3, 4, 5)
T2 = T1 + datetime.timedelta(minutes=20)
T3 = T1 + datetime.timedelta(minutes=40)


def test_the_token_is_botocores_presigned_connect_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bytes as botocore's RequestSigner.generate_presigned_url (the recipe of AWS's own
    examples) at the same instant, without the scheme."""
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: T1)   # the reference's clock only
    emitter = HierarchicalEmitter()
    signer = RequestSigner(ServiceId("elasticache"), "eu-west-1", "elasticache", "v4", CREDS, emitter)
    for serverless, extra in ((False, ""), (True, "&ResourceType=ServerlessCache")):
        reference = signer.generate_presigned_url(
            {"method": "GET", "url": f"http://my-rg/?Action=connect&User=app{extra}", "body": {}, "headers": {},
             "context": {}}, operation_name="connect", expires_in=900, region_name="eu-west-1")
        assert mint_token("app", "my-rg", CREDS, "eu-west-1", serverless=serverless, now=T1) == \
            reference.removeprefix("http://")
    token = mint_token("app", "my-rg", CREDS, "eu-west-1", now=T1)
    host, _, query = token.partition("/?")
    fields = {k: v[0] for k, v in parse_qs(query).items()}
    assert host == "my-rg"
    assert fields["Action"] == "connect" and fields["User"] == "app"
    assert fields["X-Amz-Expires"] == "900" and fields["X-Amz-Date"] == "20260102T030405Z"
    assert fields["X-Amz-Credential"] == "AKIDEXAMPLE/20260102/eu-west-1/elasticache/aws4_request"
    assert fields["X-Amz-Security-Token"] == "session-token"
    assert "ResourceType" not in fields
    # Another instant, another token: the signature covers the time.
    assert mint_token("app", "my-rg", CREDS, "eu-west-1", now=T2) != token


def test_iam_urls_round_trip_and_refuse_what_cannot_work() -> None:
    ep = parse_url("valkeys://app@clustercfg.my-rg.use1.cache.amazonaws.com:6379?iam=1&cache=my-rg&region=us-east-1")
    assert ep.iam == IamAuth(user="app", cache="my-rg", region="us-east-1")
    assert ep.password is None and ep.username is None
    assert ep.redacted() == "valkeys://app@clustercfg.my-rg.use1.cache.amazonaws.com:6379?iam=1"
    assert parse_url(ep.to_url()).iam == ep.iam   # how the worker's processes are handed their endpoints
    serverless = parse_url("valkeys://app@h:6379?iam=1&cache=c&serverless=1&reauth=30")
    assert serverless.iam is not None and serverless.iam.serverless and serverless.iam.reauth_after == 30
    assert parse_url(serverless.to_url()).iam == serverless.iam
    assert ep.with_address("10.0.0.9", 6380).iam == ep.iam    # every node of the cluster
    for bad, says in (("valkeys://app:secret@h?iam=1&cache=c", "no password"),
                      ("valkeys://h?iam=1&cache=c", "user id"),
                      ("valkeys://app@h?iam=1", "cache="),
                      ("valkeys://app@h?iam=1&cache=c&reauth=x", "reauth"),
                      ("valkeys://app@h?iam=1&cache=c&reauth=50000", "below 43200")):
        with pytest.raises(UsageError, match=says):
            parse_url(bad)
    assert IamAuth(user="app", cache="c").reauth_after == REAUTH_AFTER < 12 * 3600


def _server_with_iam_user(make_server: Any, token: str) -> Any:
    """A Valkey 9 server on which only the ACL user "app" with password ``token`` can do anything."""
    server = make_server(engine="valkey9")
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "admin", "on", ">admin-pw", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "app", "on", f">{token}", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")
    admin.close()
    return server


def _admin(server: Any) -> Any:
    return server.client(username="admin", password="admin-pw")


class Clock:
    def __init__(self, at: datetime.datetime) -> None:
        self.at = at

    def __call__(self) -> datetime.datetime:
        return self.at


def test_a_connection_gets_in_with_the_minted_token_and_only_with_it(make_server: Any) -> None:
    server = _server_with_iam_user(make_server, mint_token("app", "my-rg", CREDS, "us-east-1", now=T1))

    async def run(at: datetime.datetime) -> Any:
        iam = IamAuth(user="app", cache="my-rg", region="us-east-1", credentials=CREDS, clock=Clock(at))
        conn = await Connection.open(Endpoint("127.0.0.1", server.port, iam=iam))
        try:
            await conn.call("SET", "k", "v")
            return await conn.call("ACL", "WHOAMI"), await conn.call("GET", "k")
        finally:
            await conn.close()

    assert asyncio.run(run(T1)) == (b"app", b"v")
    with pytest.raises(ConnectError, match="IAM authentication as 'app' for 'my-rg' failed") as failed:
        asyncio.run(run(T2))    # signed at another instant: another token, which the server refuses
    assert "X-Amz" not in str(failed.value)      # never the token in a message


def test_a_long_lived_connection_authenticates_again_with_a_fresh_token(make_server: Any) -> None:
    """Re-authentication before the interval is up (here 0.3 s instead of 11 h): the token signed at the
    clock's new instant is sent on the same connection; a server that no longer accepts what the minter
    signs ends that connection's use with a clear error instead of letting it run on unauthenticated."""
    server = _server_with_iam_user(make_server, mint_token("app", "my-rg", CREDS, "us-east-1", now=T1))
    admin = _admin(server)
    clock = Clock(T1)
    iam = IamAuth(user="app", cache="my-rg", region="us-east-1", credentials=CREDS, clock=clock, reauth_after=0.3)

    def auth_calls() -> int:
        return int(admin.info("commandstats").get("cmdstat_auth", {}).get("calls", 0))

    async def run() -> None:
        conn = await Connection.open(Endpoint("127.0.0.1", server.port, iam=iam))
        before = auth_calls()
        assert before >= 1
        # The server now accepts only the token for T2 (ACL resetpass: the old one is gone), and the
        # minter's clock moves to T2.
        admin.execute_command("ACL", "SETUSER", "app", "resetpass",
                              f">{mint_token('app', 'my-rg', CREDS, 'us-east-1', now=T2)}")
        clock.at = T2

        async def reauthenticated() -> bool:
            await conn.call("INCR", "n")
            return auth_calls() > before

        await wait_for_async("a re-authentication", reauthenticated, 10)
        assert await conn.call("ACL", "WHOAMI") == b"app"
        # Now a rotation the minter cannot follow: the next re-authentication fails, loudly.
        admin.execute_command("ACL", "SETUSER", "app", "resetpass", ">something-else")
        clock.at = T3
        with pytest.raises(ConnectError, match="IAM authentication as 'app'"):
            for _ in range(400):
                await conn.call("PING")
                await asyncio.sleep(0.05)
        assert not conn.usable      # never used again: a Side opens a new one (which fails loudly too)
        await conn.close()

    asyncio.run(run())


class IamServer:
    """A LocalServer as migrate_under_load sees it, whose engine endpoint authenticates through IAM
    (ACL user "app", password the token of the frozen instant); the applications and the test's own
    clients stay on the default user."""

    def __init__(self, server: Any, cache: str) -> None:
        self.server, self.port, self.cache = server, server.port, cache
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "app", "on", f">{mint_token('app', cache, CREDS, 'us-east-1', now=T1)}",
                              "~*", "&*", "+@all")
        admin.close()

    def client(self) -> Any:
        return self.server.client()

    def endpoint(self) -> Endpoint:
        iam = IamAuth(user="app", cache=self.cache, region="us-east-1", credentials=CREDS, clock=Clock(T1))
        return Endpoint("127.0.0.1", self.port, iam=iam)


def _client_session(name: str) -> bool:
    return name.startswith("durablecache-proxy-") and name.rsplit("-", 1)[1].isdigit()


def test_a_whole_migration_authenticates_every_engine_connection_through_iam(make_server: Any) -> None:
    """Copier, syncer, witness, gate, verifier and the proxy's own (admin) connections: every connection
    the engine opens for itself (they all name themselves durablecache-*) is the IAM user's, on both
    sides, sampled with CLIENT LIST while the migration runs. The proxy's per-client upstream
    connections (durablecache-proxy-<n>) carry the application's own identity, not ours: excluded."""
    from test_migrate import migrate_under_load

    source = IamServer(make_server(engine="valkey8"), "src-rg")
    target = IamServer(make_server(engine="valkey9"), "dst-rg")
    seen: dict[str, set[tuple[str, str]]] = {"source": set(), "target": set()}
    done = threading.Event()

    sampler_name = "durablecache-test-sampler"   # our own to the gate, which admits only those

    def sample() -> None:
        clients = {side: s.server.client(client_name=sampler_name) for side, s in (("source", source),
                                                                                    ("target", target))}
        while not done.wait(0.05):
            for side, client in clients.items():
                for entry in client.client_list():
                    name = entry.get("name", "")
                    if name.startswith("durablecache") and name != sampler_name and not _client_session(name):
                        seen[side].add((entry["name"], entry["user"]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = asyncio.run(migrate_under_load(source, target, cluster=False, keys=2000))
    finally:
        done.set()
        sampler.join(10)
    assert r["lost"] == [] and r["equal"]
    for side in ("source", "target"):
        users = {user for _name, user in seen[side]}
        assert users == {"app"}, (side, sorted(seen[side]))
    names = {name for side in seen.values() for name, _user in side}
    # The long-lived ones are always caught by the sampling; short ones (scan, verify, proxy-admin)
    # usually are.
    assert {"durablecache-sync", "durablecache-witness"} <= names, sorted(names)


def test_the_manifest_says_which_side_authenticates_through_iam() -> None:
    """spec.<side>.auth.iam -> the worker's endpoints (k8s/spec.py; the CRD's own rules are in
    tests/kube/test_crd.py)."""
    from durablecache.k8s.spec import DurableCacheSpec, SpecError

    obj: dict[str, Any] = {
        "metadata": {"name": "sessions", "namespace": "shop"},
        "spec": {"source": {"replicationGroupId": "old-rg", "auth": {"iam": {"userId": "app"}}},
                 "target": {"provider": "aws", "replicationGroupId": "new-rg", "durability": "sync",
                            "auth": {"iam": {"userId": "migrator", "region": "eu-west-1"}}},
                 "endpoint": {"secretName": "sessions-endpoint"}}}

    def iam_auth(side: str) -> IamAuth | None:
        return DurableCacheSpec.parse(obj).iam_auth(side)
    assert iam_auth("source") == IamAuth(user="app", cache="old-rg")
    assert iam_auth("target") == IamAuth(user="migrator", cache="new-rg", region="eu-west-1")
    del obj["spec"]["target"]["replicationGroupId"]       # the aws target is named after the resource
    assert iam_auth("target") == IamAuth(user="migrator", cache="sessions", region="eu-west-1")
    obj["spec"]["target"] = {"provider": "static", "durability": "sync", "endpoints": [{"host": "h", "port": 1}]}
    obj["spec"]["source"] = {"endpoints": [{"host": "h", "port": 6379}], "auth": {"iam": {"userId": "app"}}}
    with pytest.raises(SpecError, match=r"spec.source.auth.iam.cacheName.*no source.replicationGroupId"):
        iam_auth("source")
    obj["spec"]["source"]["auth"]["iam"]["cacheName"] = "self-named"
    assert iam_auth("source") == IamAuth(user="app", cache="self-named")
    obj["spec"]["source"]["authSecretRef"] = {"name": "s"}
    with pytest.raises(SpecError, match="at most one of authSecretRef or auth.iam"):
        iam_auth("source")
    del obj["spec"]["source"]["auth"], obj["spec"]["source"]["authSecretRef"]
    assert iam_auth("source") is None


def test_a_password_file_next_to_an_iam_url_is_refused(tmp_path: Any) -> None:
    import argparse

    from durablecache.commands._common import side_endpoint

    secret = tmp_path / "pw"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    url = "valkeys://app@h:6379?iam=1&cache=c"
    args = argparse.Namespace(source=url, source_password_file=str(secret))
    with pytest.raises(UsageError, match="authenticates through IAM"):
        side_endpoint(args, "source")
    args.source_password_file = None
    assert side_endpoint(args, "source").iam == IamAuth(user="app", cache="c")
