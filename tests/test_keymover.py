"""KeyMover's string fast path on real servers: keys the bulk copy's SCAN ... TYPE string listed
are read with GETRANGE and written with SET [PXAT]. The list is only a hint: whatever it claims,
the target must end up exactly like the source."""

from __future__ import annotations

import asyncio

from durablecache.keymover import MoverOptions
from durablecache.movers import MoverPool
from durablecache.topology import discover
from keyspace import dump_all


def move(source, target, keys: list[bytes], strings: frozenset[bytes], big_key_bytes: int = 64 << 20):
    async def scenario():
        src, dst = await discover(source.endpoint()), await discover(target.endpoint())
        pool = MoverPool(src, dst, size=1, opts=MoverOptions(big_key_bytes=big_key_bytes))
        try:
            return await pool.move(0, keys, strings)
        finally:
            await pool.close()

    return asyncio.run(scenario())


def test_stale_string_hints_still_copy_exactly(source, target):
    c, t = source.client(), target.client()
    c.set("plain", "v" * 100)
    c.set("with-ttl", "x", px=600_000)
    c.set("number", 12345)
    c.set("empty", "")  # GETRANGE cannot tell it from a missing key
    c.hset("now-a-hash", mapping={"f": "v"})  # was a string when SCAN looked
    c.rpush("a-list", "a", "b")  # not hinted: the script path
    t.hset("plain", mapping={"old": "type"})  # SET must replace another type, like RESTORE REPLACE
    t.set("number", "1", px=900_000)  # ... and drop an expiry the source does not have
    t.set("missing", "stale")  # gone from the source: removed from the target
    keys = [b"plain", b"with-ttl", b"number", b"empty", b"now-a-hash", b"a-list", b"missing"]
    hint = frozenset(keys) - {b"a-list"}

    res = move(source, target, keys, hint)

    assert dump_all(t) == dump_all(c)
    assert t.ttl("number") == -1
    assert abs(t.pexpiretime("with-ttl") - c.pexpiretime("with-ttl")) <= 1
    assert t.get("empty") == b"" and t.type("now-a-hash") == b"hash"
    assert (res.copied, res.deleted, res.big) == (6, 1, 0)


def test_string_over_the_limit_is_copied_in_chunks(source, target):
    c, t = source.client(), target.client()
    c.set("big", b"\x00\xff" * 40_000, px=700_000)
    c.set("small", "s")

    res = move(source, target, [b"big", b"small"], frozenset({b"big", b"small"}), big_key_bytes=50_000)

    assert (res.copied, res.big) == (2, 1)
    assert dump_all(t) == dump_all(c)
    assert abs(t.pexpiretime("big") - c.pexpiretime("big")) <= 1
