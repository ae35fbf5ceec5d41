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
from typing import Any

import pytest
from botocore.credentials import Credentials
from rawclient import Raw, refused

from durablecache.iamauth import IamAuth, mint_token
from durablecache.localvalkey import LocalServer
from durablecache.proxy.iamsessions import iam_user
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

    def endpoint(self) -> Endpoint:
        iam = IamAuth(user="migrator", cache=self.cache, region=REGION, credentials=CREDS, clock=lambda: T1)
        return Endpoint("127.0.0.1", self.server.port, iam=iam)

    def admin(self) -> Any:
        return self.server.client(username="admin", password="admin-pw")

    def auth_calls(self, user: str) -> list[str]:
        """The users of this server's current connections named by the proxy for client sessions."""
        with self.admin() as c:
            return sorted(e["user"] for e in c.client_list()
                          if e.get("name", "").startswith("durablecache-proxy-") and e["name"].rsplit("-", 1)[1].isdigit()
                          and e["user"] == user)


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
