"""valkey-py through the proxy in front of a standalone server: behaviour unchanged, marks exact."""

from __future__ import annotations

import threading
import time

import pytest
import valkey

from durablecache.testing.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def client(port: int, **kw: object) -> valkey.Valkey:
    return valkey.Valkey(host="127.0.0.1", port=port, socket_timeout=10, **kw)  # type: ignore[arg-type]


def test_commands_work_and_marks_are_exactly_the_written_keys(source, make_proxy):
    p = make_proxy(source.endpoint())
    c = client(p.port)
    assert c.set("s", "1") and c.get("s") == b"1"
    c.hset("h", mapping={"f": "v"})
    assert c.hgetall("h") == {b"f": b"v"}
    c.lpush("l", "a", "b")
    assert c.lrange("l", 0, -1) == [b"b", b"a"]
    c.set("old", "x")
    c.rename("old", "new")
    c.eval("redis.call('set', KEYS[1], ARGV[1]); return 1", 1, "ev", "v")
    c.mset({"m1": "1", "m2": "2"})
    c.rpush("src", "3", "1", "2")
    c.sort("src", store="sorted")
    c.xadd("stream", {"a": "1"})
    c.expire("s", 100)
    c.delete("m1")
    c.execute_command("COPY", "s", "copied")
    assert c.lrange("sorted", 0, -1) == [b"1", b"2", b"3"]
    expected = {b"s", b"h", b"l", b"old", b"new", b"ev", b"m1", b"m2", b"src", b"sorted", b"stream",
                b"copied"}
    assert p.keys(0) == expected
    # Reads mark nothing.
    p.clear()
    c.get("s"), c.hgetall("h"), c.lrange("l", 0, -1), c.exists("s"), c.ttl("s"), c.xrange("stream")
    c.eval_ro("return redis.call('get', KEYS[1])", 1, "s") if hasattr(c, "eval_ro") else None
    c.sort("src")
    assert p.marks == []


def test_pipeline_transaction_and_select(source, make_proxy):
    p = make_proxy(source.endpoint())
    c = client(p.port)
    pipe = c.pipeline(transaction=False)
    for i in range(50):
        pipe.set(f"k{i}", i)
        pipe.get(f"k{i}")
    replies = pipe.execute()
    assert replies[1::2] == [str(i).encode() for i in range(50)]
    tx = c.pipeline(transaction=True)
    tx.incr("counter").incr("counter").get("counter")
    assert tx.execute() == [1, 2, b"2"]
    c3 = client(p.port, db=3)
    c3.set("in3", "x")
    assert source.client().get("in3") is None and source.client(db=3).get("in3") == b"x"
    assert (3, b"in3") in p.marks and (0, b"in3") not in p.marks
    assert (0, b"counter") in p.marks and {f"k{i}".encode() for i in range(50)} <= p.keys(0)


def test_watch_conflict_aborts_exec(source, make_proxy):
    p = make_proxy(source.endpoint())
    c, other = client(p.port), client(p.port)
    c.set("w", "1")
    with c.pipeline(transaction=True) as tx:
        tx.watch("w")
        other.set("w", "2")
        tx.multi()
        tx.set("w", "3")
        with pytest.raises(valkey.WatchError):
            tx.execute()
    assert c.get("w") == b"2"


def test_client_name_is_local_and_upstream_sees_only_our_names(source, make_proxy):
    p = make_proxy(source.endpoint())
    c = client(p.port)
    c.client_setname("my-app")
    assert c.client_getname() == "my-app" or c.client_getname() == b"my-app"
    c.ping()
    names = [cl["name"] for cl in source.client().client_list() if cl["cmd"] != "client|list"]
    assert names and all(n.startswith("durablecache-") for n in names), names
    with pytest.raises(valkey.ResponseError, match="cannot contain spaces"):
        c.execute_command("CLIENT", "SETNAME", "a b")


def test_blocking_pop_and_pubsub(source, make_proxy):
    p = make_proxy(source.endpoint())
    c, other = client(p.port), client(p.port)
    threading.Timer(0.2, lambda: other.rpush("q", "job")).start()
    assert c.blpop(["q"], timeout=5) == (b"q", b"job")
    assert (0, b"q") in p.marks
    ps = c.pubsub()
    ps.subscribe("news")
    assert ps.get_message(timeout=5)["type"] == "subscribe"
    other.publish("news", "hello")
    msg = ps.get_message(timeout=5)
    assert msg and msg["data"] == b"hello"
    ps.unsubscribe("news")
    assert ps.get_message(timeout=5)["type"] == "unsubscribe"
    ps.close()


def test_resp3_pushes_are_forwarded_and_not_counted_as_replies(source, make_proxy):
    p = make_proxy(source.endpoint())
    c = client(p.port, protocol=3)
    other = client(p.port)
    got: list[bytes] = []
    ps = c.pubsub()
    ps.subscribe(**{"ch": lambda m: got.append(m["data"])})
    watcher = source.client()

    def subscribed_upstream() -> int:
        ps.get_message(timeout=0.1)
        return int(watcher.pubsub_numsub("ch")[0][1])

    wait_for("the subscription upstream", subscribed_upstream, 5)
    for i in range(3):
        other.publish("ch", f"m{i}")

    def delivered() -> bool:
        ps.get_message(timeout=0.1)
        return len(got) >= 3

    wait_for("three messages", delivered, 5, describe=lambda: got)
    assert got == [b"m0", b"m1", b"m2"]
    c.set("after", "1")                      # the same client keeps working with pushes around
    assert c.get("after") == b"1"
    ps.close()


def test_unsafe_commands_are_refused_during_migration(source, make_proxy):
    p = make_proxy(source.endpoint())
    c = client(p.port)
    c.set("keep", "1")
    for cmd in (["FLUSHALL"], ["FLUSHDB"], ["SWAPDB", "0", "1"], ["MOVE", "keep", "1"],
                ["COPY", "keep", "x", "DB", "2"]):
        with pytest.raises(valkey.ResponseError, match="refused during a migration"):
            c.execute_command(*cmd)
    assert c.get("keep") == b"1"
    q = make_proxy(source.endpoint(), migrating=False)
    assert client(q.port).execute_command("FLUSHDB") in (True, b"OK")
    assert c.get("keep") is None


def test_inline_commands(source, make_proxy):
    import socket
    p = make_proxy(source.endpoint())
    with socket.create_connection(("127.0.0.1", p.port), 5) as s:
        s.sendall(b"PING\r\nSET inl \"a b\"\r\nGET inl\r\n")
        buf = b""
        deadline = time.monotonic() + 5
        while buf.count(b"\r\n") < 4 and time.monotonic() < deadline:
            buf += s.recv(1024)
    assert buf == b"+PONG\r\n+OK\r\n$3\r\na b\r\n"
    assert p.keys(0) == {b"inl"}


@pytest.mark.parametrize("protocol", [2, 3])
def test_client_side_caching_is_refused_clearly(source, make_proxy, protocol):
    """CLIENT TRACKING ON is refused (its invalidations would not survive a switch of server), OFF
    and the questions about it still work; nothing else on the connection is affected."""
    p = make_proxy(source.endpoint())
    c = client(p.port, protocol=protocol)
    with pytest.raises(valkey.ResponseError, match="CLIENT TRACKING .*not supported through the proxy"):
        c.client_tracking_on()
    with pytest.raises(valkey.ResponseError, match="client-side caching off"):
        c.execute_command("CLIENT", "TRACKING", "on", "BCAST")
    assert c.client_tracking_off()
    assert c.client_getredir() == -1
    assert c.set("after-tracking", "1") and c.get("after-tracking") == b"1"
    c.close()
