"""AUTH enforcement, and the cutover primitives: FREEZE, FLIP, UNFREEZE."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import valkey

from durablecache.testing.waiting import wait_for
from durablecache.urls import Endpoint

pytestmark = pytest.mark.timeout(60)


def client(port: int, **kw: object) -> valkey.Valkey:
    return valkey.Valkey(host="127.0.0.1", port=port, socket_timeout=10, **kw)  # type: ignore[arg-type]


def test_auth_is_enforced_and_the_clients_own_credentials_are_used(make_server, make_proxy):
    server = make_server(password="s3cret", acl_user=("app", "app-pw"))
    p = make_proxy(server.endpoint())
    anon = client(p.port)
    for call in (lambda: anon.get("k"), lambda: anon.set("k", "v"), lambda: anon.client_setname("x"),
                 lambda: anon.execute_command("HELLO", "3")):
        with pytest.raises(valkey.AuthenticationError):
            call()
    with pytest.raises(valkey.AuthenticationError):
        client(p.port, password="wrong").ping()
    good = client(p.port, password="s3cret")
    assert good.set("k", "v") and good.get("k") == b"v"
    acl = client(p.port, username="app", password="app-pw")
    assert acl.get("k") == b"v" and acl.acl_whoami() in ("app", b"app")
    assert p.keys(0) == {b"k"}
    names = {cl["name"] for cl in server.client().client_list() if cl["cmd"] != "client|list"}
    assert names and all(n.startswith("durablecache-") for n in names), names


def test_freeze_holds_writes_not_reads_and_unfreeze_releases(source, make_proxy):
    p = make_proxy(source.endpoint())
    c, reader = client(p.port), client(p.port)
    c.set("a", "1")
    p.run(p.proxy.freeze(5))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(lambda: c.set("a", "2"))
        assert reader.get("a") == b"1"          # reads go on
        wait_for("one held write", lambda: p.proxy.stats()["held"] == 1, 5)
        assert reader.get("a") == b"1"          # served after the held write came in: it is still held
        assert not held.done() and source.client().get("a") == b"1"
        p.call(p.proxy.unfreeze)
        assert held.result(5) is True
    assert source.client().get("a") == b"2"


def test_freeze_waits_for_in_flight_writes_and_their_marks(source, make_proxy):
    p = make_proxy(source.endpoint())
    p.mark_delay = 0.4              # a slow syncer: the write's ack waits for it, and so does FREEZE
    c = client(p.port)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        submitted = time.monotonic()
        write = pool.submit(lambda: c.set("slow", "1"))
        wait_for("a write in flight", lambda: p.proxy.stats()["inflight_writes"] > 0, 5)
        p.run(p.proxy.freeze(5))
        assert time.monotonic() - submitted >= 0.35      # the freeze waited for the slow marks
        assert (0, b"slow") in p.marks and write.result(5) is True
    p.mark_delay = 0
    with pytest.raises(TimeoutError):       # a freeze that cannot quiesce says so, and stays frozen
        p.mark_delay = 2
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            p.call(p.proxy.unfreeze)
            pool.submit(lambda: c.set("slow2", "1"))
            wait_for("a write in flight", lambda: p.proxy.stats()["inflight_writes"] > 0, 5)
            p.run(p.proxy.freeze(0.2))
    assert p.proxy.frozen
    p.call(p.proxy.unfreeze)


def test_freeze_unblocks_a_blocking_write_in_flight(source, make_proxy):
    p = make_proxy(source.endpoint())
    c = client(p.port)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(lambda: c.blpop(["nothing"], timeout=30))
        d = source.client()
        wait_for("the BLPOP upstream", lambda: any(x["cmd"] == "blpop" for x in d.client_list()), 5)
        started = time.monotonic()
        p.run(p.proxy.freeze(5))
        assert time.monotonic() - started < 2
        assert blocked.result(5) is None          # the timeout reply the client already handles
    p.call(p.proxy.unfreeze)


def test_flip_moves_clients_with_their_state(make_server, make_proxy):
    old, new = make_server(), make_server()
    p = make_proxy(old.endpoint())
    c = client(p.port, db=2)
    c.client_setname("flipper")
    c.set("before", "old")
    tx_client = client(p.port)
    watcher = tx_client.pipeline(transaction=True)
    watcher.watch("w")
    open_multi = client(p.port)
    open_multi.execute_command("MULTI")
    open_multi.execute_command("SET", "in-multi", "1")
    p.run(p.proxy.freeze(5))
    p.run(p.proxy.flip(new.endpoint()))
    p.call(p.proxy.unfreeze)
    c.set("after", "new")
    assert new.client(db=2).get("after") == b"new" and old.client(db=2).get("after") is None
    assert c.get("before") is None               # reads now go to the new side too
    assert c.client_getname() in ("flipper", b"flipper")
    # An open MULTI is aborted: EXEC answers as for a touched watched key.
    open_multi.execute_command("SET", "in-multi-2", "1")
    assert open_multi.execute_command("EXEC") is None
    assert new.client().get("in-multi") is None and new.client().get("in-multi-2") is None
    # A WATCH across FLIP: the transaction fails as if the watched key changed.
    watcher.multi()
    watcher.set("w", "1")
    with pytest.raises(valkey.WatchError):
        watcher.execute()
    names = {cl["name"] for cl in new.client().client_list() if cl["cmd"] != "client|list"}
    assert names and all(n.startswith("durablecache-") for n in names), names


def command_calls(server) -> int:
    """How often COMMAND (what a flip's discovery sends) has run on ``server``."""
    return int(server.client().info("commandstats").get("cmdstat_command", {}).get("calls", 0))


def test_a_prepared_flip_discovers_nothing_while_writes_are_frozen(make_server, make_proxy):
    old, new, other = make_server(), make_server(), make_server()
    p = make_proxy(old.endpoint())
    c = client(p.port)
    p.run(p.proxy.prepare_flip(new.endpoint()))
    prepared = command_calls(new)
    assert prepared >= 1
    p.run(p.proxy.freeze(5))
    p.run(p.proxy.flip(new.endpoint()))
    p.call(p.proxy.unfreeze)
    assert command_calls(new) == prepared                 # the flip used what prepare_flip found
    c.set("after", "1")
    assert new.client().get("after") == b"1" and old.client().get("after") is None

    def flip(to) -> None:
        p.run(p.proxy.freeze(5))
        p.run(p.proxy.flip(to.endpoint()))
        p.call(p.proxy.unfreeze)

    # A preparation is used once ...
    flip(old)
    flip(new)
    assert command_calls(new) == prepared + 1
    # ... and only for the endpoint it was made for.
    p.run(p.proxy.prepare_flip(old.endpoint()))
    before = command_calls(other)
    flip(other)
    assert command_calls(other) == before + 1
    c.set("after-other", "1")
    assert other.client().get("after-other") == b"1"


def test_flip_with_subscriber_and_held_writes(make_server, make_proxy):
    old, new = make_server(), make_server()
    p = make_proxy(old.endpoint())
    sub = client(p.port).pubsub()
    sub.subscribe("ch")
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    w = client(p.port)
    p.run(p.proxy.freeze(5))
    done = threading.Event()
    threading.Thread(target=lambda: (w.set("held", "1"), done.set()), daemon=True).start()
    wait_for("the write held", lambda: p.proxy.stats()["held"] == 1, 5)
    p.run(p.proxy.flip(new.endpoint()))
    assert not done.is_set()
    p.call(p.proxy.unfreeze)
    assert done.wait(5)
    assert new.client().get("held") == b"1" and old.client().get("held") is None
    wait_for("the subscription on the new side", lambda: new.client().pubsub_numsub("ch")[0][1], 5)
    new.client().publish("ch", "on-new-side")
    msg = sub.get_message(timeout=5)
    while msg is not None and msg["type"] != "message":
        msg = sub.get_message(timeout=5)
    assert msg is not None and msg["data"] == b"on-new-side"
    sub.close()


def test_tls_to_upstream_and_for_clients(tls_server, tls_certs, make_proxy):
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_certs["cert"], tls_certs["key"])
    p = make_proxy(tls_server.endpoint(), client_tls=ctx)
    c = client(p.port, ssl=True, ssl_ca_certs=tls_certs["ca"], password="tls-secret")
    assert c.set("t", "1") and c.get("t") == b"1"
    assert tls_server.client().get("t") == b"1"
    assert p.keys(0) == {b"t"}
    with pytest.raises(valkey.ConnectionError):
        client(p.port, password="tls-secret").ping()   # plain text to a TLS listener


def test_upstream_endpoint_without_tls_fails_clearly(make_proxy):
    from durablecache.errors import ConnectError
    from durablecache.ports import free_port
    with pytest.raises(ConnectError):
        make_proxy(Endpoint("127.0.0.1", free_port()))
