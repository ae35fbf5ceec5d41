"""PREPARE opens each session's connection to the next side, set up as the session's (user, database,
protocol, name); FLIP hands those over; state changed between PREPARE and FLIP follows; an aborted
attempt closes them; the connection budget refuses an attempt that would not fit."""

from __future__ import annotations

import socket

import libvalkey
import pytest

from durablecache.errors import RefusedError
from durablecache.testing.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

ACL = ("app", "app-secret")
PASSWORD = "admin-secret"


class Raw:
    """A client connection through the proxy, replies read raw (to see RESP3's types)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = libvalkey.Reader()

    def call(self, *args: str | bytes) -> tuple[bytes, object]:
        """(the reply's first byte, the parsed reply)."""
        self.sock.sendall(libvalkey.pack_command(args))
        first = b""
        while True:
            data = self.sock.recv(65536)
            assert data, "connection closed"
            first = first or data[:1]
            self.reader.feed(data)
            reply = self.reader.gets()
            if reply is not False:
                return first, reply

    def close(self) -> None:
        self.sock.close()


def ours(server) -> dict[str, dict]:
    """The proxy's session connections on ``server``, by name."""
    return {c["name"]: c for c in server.client().client_list()
            if c["name"].startswith("durablecache-proxy-") and not c["name"].endswith("-admin")}


def flip(p, to) -> None:
    p.run(p.proxy.freeze(5))
    p.run(p.proxy.flip(to.endpoint()))
    p.call(p.proxy.unfreeze)


def test_prepared_sessions_keep_user_database_and_protocol_across_flip(make_server, make_proxy):
    old = make_server(password=PASSWORD, acl_user=ACL)
    new = make_server(password=PASSWORD, acl_user=ACL)
    p = make_proxy(old.endpoint(), require_auth=True)
    resp3 = Raw(p.port)                                   # ACL user, db 2, RESP3: all before PREPARE
    assert resp3.call("HELLO", "3", "AUTH", *ACL)[0] == b"%"
    assert resp3.call("SELECT", "2")[1] == b"OK"
    selects = Raw(p.port)                                 # changes its db between PREPARE and FLIP
    assert selects.call("AUTH", *ACL)[1] == b"OK"
    assert selects.call("PING")[1] == b"PONG"
    late = Raw(p.port)                                    # authenticates between PREPARE and FLIP
    assert late.call("PING")[0] == b"-"                   # NOAUTH

    p.run(p.proxy.prepare_flip(new.endpoint()))
    prepared = ours(new)
    assert len(prepared) == 2, prepared                   # the two authenticated sessions
    assert {(c["user"], c["db"], c["resp"]) for c in prepared.values()} == {("app", "2", "3"), ("app", "0", "2")}

    assert selects.call("SELECT", "5")[1] == b"OK"
    assert late.call("AUTH", *ACL)[1] == b"OK"
    prepared = [("app", "0"), ("app", "2"), ("app", "5")]
    wait_for(f"prepared connections {prepared}",
             lambda: sorted((c["user"], c["db"]) for c in ours(new).values()) == prepared, 10)
    before_flip = {name: c["id"] for name, c in ours(new).items()}

    flip(p, new)
    assert resp3.call("SET", "k3", "v")[1] == b"OK"
    assert selects.call("SET", "k5", "v")[1] == b"OK"
    assert late.call("SET", "k0", "v")[1] == b"OK"
    assert resp3.call("ACL", "WHOAMI")[1] == b"app" and resp3.call("HGETALL", "nothing")[0] == b"%"     # RESP3 still
    assert selects.call("ACL", "WHOAMI")[1] == b"app" and late.call("ACL", "WHOAMI")[1] == b"app"
    direct = {db: new.client(db=db) for db in (0, 2, 5)}
    assert direct[2].get("k3") == b"v" and direct[5].get("k5") == b"v" and direct[0].get("k0") == b"v"
    assert old.client(db=2).get("k3") is None
    # The very connections prepared before the freeze carry the sessions: none was opened at FLIP.
    assert {name: c["id"] for name, c in ours(new).items()} == before_flip
    for c in (resp3, selects, late):
        c.close()


def test_a_session_opened_after_prepare_is_prepared_as_it_opens(make_server, make_proxy):
    old, new = make_server(), make_server()
    p = make_proxy(old.endpoint())
    p.run(p.proxy.prepare_flip(new.endpoint()))
    c = Raw(p.port)
    assert c.call("SELECT", "3")[1] == b"OK"
    wait_for("one prepared connection in db 3", lambda: [x["db"] for x in ours(new).values()] == ["3"], 10)
    ids = {name: x["id"] for name, x in ours(new).items()}
    flip(p, new)
    assert c.call("SET", "a", "1")[1] == b"OK"
    assert new.client(db=3).get("a") == b"1"
    assert {name: x["id"] for name, x in ours(new).items()} == ids
    c.close()


def test_an_aborted_attempt_closes_what_it_prepared(make_server, make_proxy):
    old, new = make_server(), make_server()
    p = make_proxy(old.endpoint())
    clients = [Raw(p.port) for _ in range(3)]
    for c in clients:
        assert c.call("PING")[1] == b"PONG"
    p.run(p.proxy.prepare_flip(new.endpoint()))
    assert len(ours(new)) == 3
    p.call(p.proxy.unprepare)
    wait_for("the prepared connections to close", lambda: not ours(new), 10)
    assert clients[0].call("SET", "x", "1")[1] == b"OK"          # still on the old side
    assert old.client().get("x") == b"1" and new.client().get("x") is None
    for c in clients:
        c.close()


def test_the_connection_budget_refuses_an_attempt_that_would_not_fit(make_server, make_proxy):
    old, new = make_server(), make_server()
    p = make_proxy(old.endpoint(), connection_budget=4)
    clients = [Raw(p.port) for _ in range(5)]
    for c in clients:
        assert c.call("PING")[1] == b"PONG"
    with pytest.raises(RefusedError, match="connection budget"):
        p.run(p.proxy.prepare_flip(new.endpoint()))
    assert not ours(new)                                   # nothing was opened
    p.proxy.connection_budget = 0                          # CONNECTION_SHARE of maxclients: fits
    p.run(p.proxy.prepare_flip(new.endpoint()))
    assert len(ours(new)) == 5
    for c in clients:
        c.close()
