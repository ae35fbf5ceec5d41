"""Client sessions authenticated with an ElastiCache IAM token across FLIP (proxy/iamsessions.py,
docs/aws.md "Client sessions across FLIP").

Real servers whose ACL users' passwords are the tokens the test mints (fixed credentials, a frozen
clock, as tests/aws/test_iamauth.py does): user "app" on the source accepts only the token for cache
"src-rg", on the target only the one for "dst-rg". The client authenticates through the proxy with the
source's token; after FLIP the proxy authenticates its session on the target as "app" with a token it
signs for "dst-rg" itself. A session that never proved to be "app" is never signed for.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
from botocore.credentials import Credentials
from rawclient import Raw, refused

from durablecache.iamauth import IamAuth, mint_token
from durablecache.proxy.iamsessions import iam_user
from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.waiting import wait_for, wait_for_async
from durablecache.urls import Endpoint

pytestmark = pytest.mark.timeout(120)

CREDS = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "session-token")
T1 = datetime.datetime(2026, 1, 2, 3, 4, 5)
REGION = "us-east-1"


def token(user: str, cache: str, at: datetime.datetime = T1) -> str:
    return mint_token(user, cache, CREDS, REGION, now=at)


class IamSide:
    """A server on which "app" (the application) and "migrator" (DurableCache's own identity) log in
    with the tokens for ``cache`` only, and ``default`` is off."""

    def __init__(self, server: LocalServer, cache: str):
        self.server, self.cache = server, cache
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "admin", "on", ">admin-pw", "~*", "&*", "+@all")
        for user in ("app", "migrator"):
            admin.execute_command("ACL", "SETUSER", user, "on", f">{token(user, cache)}", "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "default", "off")
        admin.close()

    def endpoint(self, clock: Any = lambda: T1, reauth_after: float | None = None) -> Endpoint:
        extra = {} if reauth_after is None else {"reauth_after": reauth_after}
        iam = IamAuth(user="migrator", cache=self.cache, region=REGION, credentials=CREDS, clock=clock, **extra)
        return Endpoint("127.0.0.1", self.server.port, iam=iam)

    def admin(self) -> Any:
        return self.server.client(username="admin", password="admin-pw")

    def auth_calls(self, user: str) -> list[str]:
        """This server's connections that the proxy opened for client sessions and that are ``user``'s."""
        with self.admin() as c:
            names = [(e.get("name", ""), e["user"]) for e in c.client_list()]
        return sorted(u for name, u in names if u == user and name.startswith("durablecache-proxy-")
                      and name.rsplit("-", 1)[1].isdigit())


def test_iam_tokens_are_recognised_by_their_shape() -> None:
    good = token("app", "src-rg")
    assert iam_user((b"AUTH", b"app", good.encode())) == b"app"
    assert iam_user((b"AUTH", b"other", good.encode())) is None         # signed for another user
    assert iam_user((b"AUTH", good.encode())) is None                    # default user: a password
    assert iam_user((b"AUTH", b"app", b"hunter2")) is None
    assert iam_user((b"AUTH", b"app", good.replace("Action=connect", "Action=other").encode())) is None
    assert iam_user((b"AUTH", b"app", "caché/?Action=connect".encode())) is None
    assert iam_user(None) is None


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared-at-PREPARE", "opened-after-FLIP"])
def test_a_client_authenticated_with_a_source_token_keeps_working_after_flip(make_server, make_proxy,
                                                                             prepared) -> None:
    source = IamSide(make_server(engine="valkey8"), "src-rg")
    target = IamSide(make_server(engine="valkey9"), "dst-rg")
    p = make_proxy(source.endpoint())
    c = Raw(p.port)
    assert c("AUTH", "app", token("app", "src-rg")) == b"OK"
    assert c("SET", "before", "1") == b"OK"
    assert c("ACL", "WHOAMI") == b"app"
    if prepared:      # PREPARE opens the session's target connection as "app" before the pause
        p.run(p.proxy.prepare_flip(target.endpoint()))
    p.run(p.proxy.freeze(5))
    p.run(p.proxy.flip(target.endpoint()))
    p.call(p.proxy.unfreeze)
    for i in range(20):
        assert c("SET", f"after:{i}", str(i)) == b"OK"
    assert c("ACL", "WHOAMI") == b"app"          # the same user, on the target
    with target.admin() as t:
        assert [t.get(f"after:{i}") for i in range(20)] == [str(i).encode() for i in range(20)]
        assert t.get("before") is None           # (no copy here: only the proxy is under test)
    assert target.auth_calls("app"), "the session's target connection is not the app user's"


class Clock:
    def __init__(self, at: datetime.datetime) -> None:
        self.at = at

    def __call__(self) -> datetime.datetime:
        return self.at


def test_a_moved_session_authenticates_again_with_a_fresh_token(make_server, make_proxy) -> None:
    """The target connection the proxy authenticated with its own token authenticates again, with a
    newly signed one, when its interval is up (here 0.3 s instead of 11 h), between the client's
    commands; once the server accepts no token the proxy can sign, the client's commands there fail
    with the server's error instead of running on."""
    source = IamSide(make_server(engine="valkey8"), "src-rg")
    target = IamSide(make_server(engine="valkey9"), "dst-rg")
    t2, t3 = T1 + datetime.timedelta(minutes=20), T1 + datetime.timedelta(minutes=40)
    admin = target.admin()
    for at in (t2, t3):     # DurableCache's own identity keeps working throughout
        admin.execute_command("ACL", "SETUSER", "migrator", f">{token('migrator', 'dst-rg', at)}")
    clock = Clock(T1)
    p = make_proxy(source.endpoint())
    c = Raw(p.port)
    assert c("AUTH", "app", token("app", "src-rg")) == b"OK"
    p.run(p.proxy.prepare_flip(target.endpoint(clock, reauth_after=0.3)))
    p.run(p.proxy.freeze(5))
    p.run(p.proxy.flip(target.endpoint(clock, reauth_after=0.3)))
    p.call(p.proxy.unfreeze)
    assert c("SET", "k", "0") == b"OK"

    def auth_calls() -> int:
        return int(admin.info("commandstats").get("cmdstat_auth", {}).get("calls", 0))
    before = auth_calls()
    # The server now accepts only the token for t2 (the one for T1 is gone), and the clock moves to t2.
    admin.execute_command("ACL", "SETUSER", "app", "resetpass", f">{token('app', 'dst-rg', t2)}")
    clock.at = t2
    deadline = time.monotonic() + 10
    n = 0
    while auth_calls() <= before:
        assert time.monotonic() < deadline, "no re-authentication within 10 s"
        n += 1
        assert c("INCR", "n") == n
        time.sleep(0.05)
    assert c("INCR", "n") == n + 1 and c("ACL", "WHOAMI") == b"app"
    # A rotation the proxy's signing cannot follow: the next renewal is refused, and loudly so.
    admin.execute_command("ACL", "SETUSER", "app", "resetpass", ">something-else")
    clock.at = t3
    wait_for("the client's commands refused once the renewal failed",
             lambda: refused(c("INCR", "n"), "WRONGPASS"), 10)
    admin.close()


def test_a_session_that_did_not_prove_the_user_is_not_signed_for(make_server, make_proxy) -> None:
    """A token of the right shape that the source refused (here: signed at another instant) proves
    nothing: after FLIP the session is still unauthenticated, never "app" on the target."""
    source = IamSide(make_server(engine="valkey8"), "src-rg")
    target = IamSide(make_server(engine="valkey9"), "dst-rg")
    p = make_proxy(source.endpoint())
    c = Raw(p.port)
    forged = token("app", "src-rg", T1 + datetime.timedelta(minutes=3))
    assert refused(c("AUTH", "app", forged), "WRONGPASS")
    assert refused(c("SET", "k", "v"), "NOAUTH")
    p.run(p.proxy.prepare_flip(target.endpoint()))
    p.run(p.proxy.freeze(5))
    p.run(p.proxy.flip(target.endpoint()))
    p.call(p.proxy.unfreeze)
    assert refused(c("SET", "k", "v"), "NOAUTH")
    # Not even after a password AUTH as someone else that succeeds: the proof is per AUTH.
    assert c("AUTH", "admin", "admin-pw") == b"OK"
    assert c("ACL", "WHOAMI") == b"admin"
    assert not target.auth_calls("app")


def test_a_plain_target_gets_the_clients_own_token(make_server, make_proxy) -> None:
    """Without IAM on the new side's endpoint the proxy knows no cache to sign for: the client's AUTH
    is replayed as it was sent, and the server's own refusal reaches the client (never `default`)."""
    source = IamSide(make_server(engine="valkey8"), "src-rg")
    target = IamSide(make_server(engine="valkey9"), "dst-rg")
    p = make_proxy(source.endpoint())
    c = Raw(p.port)
    assert c("AUTH", "app", token("app", "src-rg")) == b"OK"
    plain = Endpoint("127.0.0.1", target.server.port, username="admin", password="admin-pw")
    p.run(p.proxy.freeze(5))
    p.run(p.proxy.flip(plain))
    p.call(p.proxy.unfreeze)
    assert refused(c("SET", "k", "v"), "WRONGPASS")


def test_a_whole_migration_whose_application_authenticates_with_iam_tokens(make_server) -> None:
    """The engine end to end (RouteIn, copy, sync, PREPARE, FLIP, reverse sync) with IAM on both sides:
    DurableCache as "migrator", the application's writers as "app" with the source's token, through the
    proxy from RouteIn on. Their sessions keep writing after FLIP without one refusal, as "app" on the
    target, and no acknowledged write is lost."""
    import asyncio

    from durablecache.migration import Migration, MigrationOptions
    from durablecache.proxyhandles import local_proxies
    from durablecache.testing.workload import Workload, seed

    source = IamSide(make_server(engine="valkey8"), "src-rg")
    target = IamSide(make_server(engine="valkey9"), "dst-rg")
    with source.admin() as c:
        seed(c, 1000)

    async def run() -> dict[str, Any]:
        load = Workload("127.0.0.1", source.server.port, writers=3, rate=200, username="app",
                        password=token("app", "src-rg"))
        load.start()
        cut = asyncio.Event()
        at_cut: dict[str, int] = {}

        def emit(e: dict[str, Any]) -> None:
            if e["event"] == "proxies":
                host, port = e["addresses"][0].rsplit(":", 1)
                load.point_at(host, int(port))
            if e["event"] == "cutover":
                at_cut.update(acked=load.acked, refused=sum(x.refused for x in load.ledgers))
                cut.set()

        opts = MigrationOptions(gate_settle=0.5, gate_timeout=30, rollback_window=600, copy_concurrency=4)
        m = Migration(source.endpoint(), target.endpoint(), opts, local_proxies("127.0.0.1", 0), emit=emit)
        task = asyncio.create_task(m.run())
        await asyncio.wait([task, asyncio.create_task(cut.wait())], timeout=120,
                           return_when=asyncio.FIRST_COMPLETED)
        assert cut.is_set(), task.exception() if task.done() else "no cutover in 120 s"
        # Writes go on after FLIP, through the proxy.
        await wait_for_async("300 writes acknowledged after FLIP", lambda: load.acked >= at_cut["acked"] + 300, 20)
        users = target.auth_calls("app")
        await load.finish()
        with target.admin() as t:
            lost = load.lost(t)
        m.stop_requested.set()
        await asyncio.wait_for(task, 30)
        return {"lost": lost, "users": users, "at_cut": at_cut, "load": load}

    r = asyncio.run(run())
    assert r["lost"] == []
    refused = sum(x.refused for x in r["load"].ledgers)
    uncertain = sum(x.uncertain for x in r["load"].ledgers)
    assert refused == r["at_cut"]["refused"] == 0, (refused, r["at_cut"])
    assert uncertain == 0
    assert len(r["users"]) >= 3, r["users"]       # each writer's session, as "app", on the target
