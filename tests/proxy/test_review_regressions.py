"""Regressions found in review: each test failed before its fix (real servers, raw sockets where the
exact bytes or TCP segments matter)."""

from __future__ import annotations

import asyncio
import socket
import time

import libvalkey
import pytest

from durablecache.resp import pack
from durablecache.testing.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


class Raw:
    """A client socket that sends exact bytes (and TCP segments) and parses replies."""

    def __init__(self, port: int):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.r = libvalkey.Reader()

    def send(self, *cmds: tuple[str | bytes, ...]) -> None:
        self.s.sendall(pack(list(cmds)))

    def sendraw(self, data: bytes) -> None:
        self.s.sendall(data)

    def get(self, timeout: float = 5.0) -> object:
        self.s.settimeout(timeout)
        while True:
            reply = self.r.gets()
            if reply is not False:
                return reply
            data = self.s.recv(65536)
            if not data:
                raise EOFError
            self.r.feed(data)

    def close(self) -> None:
        self.s.close()


# ---- 1. a TCP split right after '*' or '$' must not turn the rest into inline commands -------------

def test_split_after_star_or_dollar_never_executes_value_bytes(source, make_proxy):
    p = make_proxy(source.endpoint())
    d = source.client()
    d.set("important", "keep-me")
    value = b"\r\nDEL important\r\nSET injected 1\r\n"
    payload = pack([(b"SET", b"note", value)])
    for cut in (1, payload.index(b"$%d\r\n" % len(value)) + 1):     # after the '*', after the '$'
        c = Raw(p.port)
        c.sendraw(payload[:cut])
        time.sleep(0.05)                                            # two segments, two reads
        c.sendraw(payload[cut:])
        assert c.get() == b"OK"
        c.close()
    assert d.get("important") == b"keep-me"
    assert d.get("injected") is None
    assert d.get("note") == value
    assert p.keys(0) == {b"note"}


def test_every_split_point_of_a_command(source, make_proxy):
    p = make_proxy(source.endpoint())
    payload = pack([(b"SET", b"key", b"abcdefgh")])
    for cut in range(1, len(payload)):
        c = Raw(p.port)
        c.sendraw(payload[:cut])
        time.sleep(0.02)
        c.sendraw(payload[cut:])
        assert c.get() == b"OK", cut
        c.close()


# ---- 2. RESP3: only '>' frames are pub/sub ------------------------------------------------------------

def test_resp3_subscribed_array_reply_starting_with_message_is_a_reply(source, make_proxy):
    p = make_proxy(source.endpoint())
    source.client().rpush("L", "message", "a", "b")
    c = Raw(p.port)
    c.send(("HELLO", "3"))
    assert isinstance(c.get(), dict)
    c.send(("SUBSCRIBE", "ch"))
    assert c.get() == [b"subscribe", b"ch", 1]
    c.send(("LRANGE", "L", "0", "-1"))
    assert c.get() == [b"message", b"a", b"b"]
    p.clear()
    c.send(("SET", "k", "v"))
    assert c.get() == b"OK"
    assert p.keys(0) == {b"k"}            # marked before the reply reached the client
    c.send(("GET", "k"))
    assert c.get() == b"v"
    c.close()


# ---- 3. a client that left with a write in flight: freeze waits for it -------------------------------

def test_freeze_waits_for_a_departed_clients_blocking_write(source, make_proxy):
    p = make_proxy(source.endpoint())
    c = Raw(p.port)
    c.send(("BLPOP", "L", "0"))
    d = source.client()
    wait_for("the BLPOP upstream", lambda: any(x["cmd"] == "blpop" for x in d.client_list()), 3)
    c.close()
    wait_for("the session to depart, its BLPOP in flight", lambda: p.call(lambda: len(p.proxy.departed)) == 1, 3)
    p.run(p.proxy.freeze(5.0))
    # Unblocked (the departed session's BLPOP got its timeout reply) and its key marked.
    assert (0, b"L") in p.marks
    assert not any(x["cmd"] == "blpop" and "b" in x["flags"] for x in d.client_list())
    p.call(p.proxy.unfreeze)


def test_freeze_waits_for_a_departed_clients_slow_script(source, make_proxy, make_server):
    p = make_proxy(source.endpoint())
    target = make_server()
    # ~1 s of Lua here (0.3 s per 1e8 iterations): still running when the client leaves.
    slow = "for i = 1, 300000000 do end; redis.call('SET', KEYS[1], 'late'); return 1"
    c = Raw(p.port)
    c.send(("EVAL", slow, "1", "k"))
    wait_for("the script sent upstream", lambda: p.call(p.proxy.stats)["inflight_writes"], 3)
    c.close()                                    # gone, its write still running on the source
    wait_for("the session to depart, its script in flight", lambda: p.call(lambda: len(p.proxy.departed)) == 1, 3)
    p.run(p.proxy.freeze(10.0))
    assert (0, b"k") in p.marks                  # answered and marked before freeze returned
    assert source.client().get("k") == b"late"
    p.run(p.proxy.flip(target.endpoint()))
    assert p.proxy.stats()["inflight_writes"] == 0
    p.call(p.proxy.unfreeze)


# ---- 4. blocking commands get an entry of their own -----------------------------------------------

def test_blocking_read_or_wait_does_not_hold_the_writes_before_it(source, make_proxy):
    p = make_proxy(source.endpoint())
    source.client().xadd("s", {"f": "v"})
    for blocking in (("XREAD", "BLOCK", "0", "STREAMS", "s", "$"), ("WAIT", "1", "0")):
        c = Raw(p.port)
        c.sendraw(pack([("SET", "k", "v"), blocking]))          # one chunk
        assert c.get(2.0) == b"OK"                             # not held behind the blocking command
        started = time.monotonic()
        p.run(p.proxy.freeze(2.0))
        assert time.monotonic() - started < 1.0
        p.call(p.proxy.unfreeze)
        c.close()


def test_freeze_unblocks_a_blocking_read_that_holds_up_a_write(source, make_proxy):
    p = make_proxy(source.endpoint())
    source.client().xadd("s", {"f": "v"})
    c = Raw(p.port)
    c.sendraw(pack([("XREAD", "BLOCK", "0", "STREAMS", "s", "$"), ("SET", "k3", "v")]))
    d = source.client()
    wait_for("the XREAD upstream", lambda: any(x["cmd"] == "xread" for x in d.client_list()), 3)
    p.run(p.proxy.freeze(3.0))
    assert c.get() is None                 # the timeout reply a client of XREAD BLOCK handles
    assert c.get() == b"OK"
    assert (0, b"k3") in p.marks
    p.call(p.proxy.unfreeze)
    c.close()


# ---- 5. authentication ---------------------------------------------------------------------------

def test_subscribe_before_auth_is_refused_and_not_replayed(make_server, make_proxy):
    srv = make_server(password="pw")
    srv.client().set("k", "v")
    p = make_proxy(srv.endpoint())
    c = Raw(p.port)
    c.send(("SUBSCRIBE", "secret"))
    assert "NOAUTH" in str(c.get())
    c.send(("AUTH", "pw"))
    assert c.get() == b"OK"
    c.send(("GET", "k"))
    assert c.get() == b"v"                 # not in subscribe mode
    c.close()


def test_no_unnamed_upstream_connection_after_reset_or_failed_auth(make_server, make_proxy):
    srv = make_server(password="pw")
    checker = srv.client()
    checker.client_setname("checker")
    p = make_proxy(srv.endpoint())
    c2 = Raw(p.port)
    c2.send(("AUTH", "pw"), ("RESET",), ("GET", "k"))
    assert [c2.get(), c2.get()] == [b"OK", b"RESET"]
    assert "NOAUTH" in str(c2.get())
    c3 = Raw(p.port)
    c3.send(("HELLO", "3", "AUTH", "default", "bad"), ("GET", "k"))
    assert "WRONGPASS" in str(c3.get())
    assert "NOAUTH" in str(c3.get())
    c4 = Raw(p.port)
    c4.send(("AUTH", "bad"))
    assert "WRONGPASS" in str(c4.get())
    wait_for("no unnamed upstream connection left", lambda: not [x for x in checker.client_list()
             if x["name"] != "checker" and not x["name"].startswith("durablecache-")], 3)
    # Authenticating afterwards still works (a new, named upstream connection).
    for c in (c2, c3, c4):
        c.send(("AUTH", "pw"), ("SET", "k", "1"))
        assert [c.get(), c.get()] == [b"OK", b"OK"]
    assert all(x["name"] == "checker" or x["name"].startswith("durablecache-") for x in checker.client_list())
    for c in (c2, c3, c4):
        c.close()


# ---- 6. SORT without STORE writes nothing: allowed inside MULTI -----------------------------------

def test_read_only_sort_inside_multi(source, make_proxy):
    p = make_proxy(source.endpoint())
    source.client().rpush("l", 3, 1, 2)
    c = Raw(p.port)
    c.send(("MULTI",), ("SORT", "l"), ("EXEC",))
    assert [c.get(), c.get(), c.get()] == [b"OK", b"QUEUED", [[b"1", b"2", b"3"]]]
    c.send(("MULTI",), ("SORT", "l", "STORE", "dst"), ("EXEC",))     # still refused: keys unknown
    replies = [c.get(), c.get(), c.get()]
    assert "refused inside MULTI" in str(replies[1]) and "EXECABORT" in str(replies[2])
    c.close()


def test_hello_and_subscribe_inside_multi_are_refused(source, make_proxy):
    """Queued, HELLO 2 would leave the proxy believing the connection speaks RESP2 while the server
    still sends RESP3 pushes (CLIENT TRACKING), which the counted reply path would take for replies;
    SUBSCRIBE would start pub/sub without the proxy knowing."""
    p = make_proxy(source.endpoint())
    c = Raw(p.port)
    c.send(("HELLO", "3"))
    assert isinstance(c.get(), (dict, list))
    for command in (("HELLO", "2"), ("SUBSCRIBE", "ch")):
        c.send(("MULTI",), command, ("EXEC",))
        replies = [c.get(), c.get(), c.get()]
        assert replies[0] == b"OK", replies
        assert "inside MULTI is not supported" in str(replies[1]) and "EXECABORT" in str(replies[2]), replies
    c.send(("CLIENT", "INFO"))
    assert b"resp=3" in c.get()  # the connection still speaks RESP3, and the proxy knows it
    c.send(("SET", "k", "v"), ("GET", "k"))
    assert [c.get(), c.get()] == [b"OK", b"v"]
    c.close()


# ---- flip() re-checks the freeze after its own awaits ----------------------------------------------

def test_flip_aborts_if_unfrozen_while_it_prepares(source, make_proxy, make_server):
    p = make_proxy(source.endpoint())
    target = make_server()

    async def race() -> None:
        await p.proxy.freeze(2.0)
        task = asyncio.get_running_loop().create_task(p.proxy.flip(target.endpoint()))
        await asyncio.sleep(0)             # flip() is now discovering the new side
        p.proxy.unfreeze()
        with pytest.raises(RuntimeError, match="unfrozen"):
            await task
    p.run(race())
    assert p.proxy.upstream == source.endpoint()


# ---- 13. command names spelled in more ways than the fast path remembers ---------------------------

def test_command_spellings_past_the_fast_path_cache(source, make_proxy):
    """The fast path remembers a bounded number of spellings; past that bound, commands must still be
    classified (a write still marked), not crash the session."""
    from durablecache.proxy.classify import FASTMAP_SPELLINGS

    p = make_proxy(source.endpoint())
    c = Raw(p.port)
    args = {b"pexpiretime": (b"k",), b"expiretime": (b"k",), b"getrange": (b"k", b"0", b"1"),
            b"sismember": (b"k", b"m"), b"hexists": (b"k", b"f"), b"zscore": (b"k", b"m"), b"exists": (b"k",),
            b"strlen": (b"k",), b"pttl": (b"k",), b"ping": (), b"echo": (b"x",), b"type": (b"k",)}
    spellings = [b"".join([name[j:j + 1].upper() if (i >> j) & 1 else name[j:j + 1] for j in range(len(name))])
                 for name in args for i in range(1 << len(name))]
    assert len(spellings) > FASTMAP_SPELLINGS
    for name in spellings:
        c.send((name, *args[name.lower()]))
    for name in spellings:
        assert not isinstance(c.get(), libvalkey.ReplyError), name
    assert p.call(lambda: len(p.proxy.fastmap.codes)) == FASTMAP_SPELLINGS
    c.send((b"iNcR", b"counter"))
    assert c.get() == 1
    wait_for("the mark for counter", lambda: (0, b"counter") in p.marks, 3)
    c.close()
