"""Copies of disjoint members of one key in flight together (docs/protocol.md, "Member-level marks"):
the syncer starts a copy of a newly marked member while copies of other members of the same key run;
a member marked while its own copy is in flight waits for that copy to end; a whole copy of a key never
overlaps any other copy of it; and a member copy never writes the key as a whole (a key gone on the
source loses only the copied members on the target), so copies that overlap cannot undo each other.

The copies run against real servers. Where a test must hold a copy in flight, it wraps the syncer's
pool so the copy waits for the test's go before it starts (the copy itself is the real one)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import valkey.asyncio as avalkey

from durablecache.keymover import MoverOptions
from durablecache.movers import MoverPool
from durablecache.proxy.members import MemberMark
from durablecache.syncer import Syncer
from durablecache.testing.waiting import wait_for_async
from durablecache.topology import discover

pytestmark = pytest.mark.timeout(120)
KEY = (0, b"lb")


def m(key: str, member: str) -> MemberMark:
    return MemberMark.of(key.encode(), member.encode())


async def make_syncer(source: Any, target: Any, workers: int = 4) -> Syncer:
    src, dst = await discover(source.endpoint()), await discover(target.endpoint())
    return Syncer(MoverPool(src, dst, size=workers, opts=MoverOptions()), workers=workers)


async def close(syncer: Syncer) -> None:
    await syncer.stop()
    await syncer.close_pools(current=True)


class Copies:
    """Wraps a pool's move and move_members: records every copy (key -> whole or its members) while it
    is in flight, and fails the test on a copy that overlaps another copy of a key it must not overlap:
    a whole copy with any copy of the key, a member copy with a copy of one of its members."""

    def __init__(self, pool: MoverPool, before: Callable[[], Awaitable[None]] | None = None):
        self.flying: list[tuple[bytes, frozenset[bytes] | None]] = []
        self.started: list[tuple[bytes, frozenset[bytes] | None]] = []
        self.overlapping_members = 0   # member copies that started beside another of the same key
        self.conflicts: list[str] = []
        self.before = before
        real_move, real_members = pool.move, pool.move_members

        async def move(db: int, keys: list[bytes], *args: Any) -> Any:
            return await self._run([(k, None) for k in keys], real_move(db, keys, *args))

        async def move_members(db: int, parts: dict[bytes, list[bytes]]) -> Any:
            return await self._run([(k, frozenset(v)) for k, v in parts.items()], real_members(db, parts))

        pool.move, pool.move_members = move, move_members  # type: ignore[method-assign]

    async def _run(self, copies: list[tuple[bytes, frozenset[bytes] | None]], copy: Awaitable[Any]) -> Any:
        for key, members in copies:
            for other, theirs in self.flying:
                if other != key:
                    continue
                if members is None or theirs is None or members & theirs:
                    self.conflicts.append(f"{key!r}: {members} overlaps {theirs}")
                else:
                    self.overlapping_members += 1
        self.flying += copies
        self.started += copies
        try:
            if self.before is not None:
                await self.before()
            return await copy
        finally:
            for c in copies:
                self.flying.remove(c)


def test_a_new_member_is_copied_beside_one_in_flight_and_a_whole_copy_waits_for_both(source, target):
    c = source.client()
    c.zadd("lb", {f"p{i}": i for i in range(100)})
    go: asyncio.Queue[asyncio.Event] = asyncio.Queue()

    async def gate() -> None:
        event = asyncio.Event()
        go.put_nowait(event)
        await event.wait()

    async def scenario() -> None:
        syncer = await make_syncer(source, target)
        await syncer.copy_now(0, [b"lb"])     # before the gate: the key's first copy
        copies = Copies(syncer.pool, gate)
        syncer.start()
        c.zincrby("lb", 1, "p1")
        syncer.mark(0, [m("lb", "p1")])
        first = await asyncio.wait_for(go.get(), 10)
        c.zincrby("lb", 1, "p2")
        syncer.mark(0, [m("lb", "p2")])
        second = await asyncio.wait_for(go.get(), 10)
        assert copies.flying == [(b"lb", frozenset({b"p1"})), (b"lb", frozenset({b"p2"}))]
        assert copies.overlapping_members == 1

        c.zincrby("lb", 1, "p1")
        syncer.mark(0, [m("lb", "p1")])       # its copy is in flight: waits for the next
        assert syncer._again[KEY] == {b"p1"} and KEY not in syncer._dirty
        c.pexpire("lb", 600_000)
        syncer.mark(0, [b"lb"])               # a whole copy: waits until no copy of lb is in flight
        syncer.mark(0, [m("lb", "p3")])       # absorbed by that whole copy
        assert syncer._again[KEY] is None and syncer.dirty_members == 0 and KEY not in syncer._dirty

        batches = syncer.stats.batches
        second.set()
        await wait_for_async("p2's copy ends", lambda: syncer.stats.batches > batches, 10)
        assert go.empty() and len(copies.flying) == 1, "the whole copy started beside p1's"
        first.set()
        (await asyncio.wait_for(go.get(), 10)).set()
        assert await syncer.drain(10)
        assert copies.started[-1] == (b"lb", None) and go.empty()
        assert copies.conflicts == []
        await close(syncer)

    asyncio.run(scenario())
    t = target.client()
    assert t.zrange("lb", 0, -1, withscores=True) == c.zrange("lb", 0, -1, withscores=True)
    assert t.pexpiretime("lb") == c.pexpiretime("lb")


def test_a_member_copy_writes_only_its_members(source, target):
    """A key gone on the source loses just the copied members on the target, not the whole key: another
    member's copy may have read the key before it went and written after (each such member has a mark
    of its own); a key the target holds with another type is left to a whole copy (``unpatched``)."""
    t = target.client()
    t.sadd("gone", "copied", "other")
    t.hset("gone-hash", mapping={"f": "1", "g": "2"})
    t.set("other-type", "x")
    source.client().sadd("other-type", "y")

    async def scenario() -> None:
        syncer = await make_syncer(source, target)
        assert syncer.pool is not None
        result = await syncer.pool.move_members(0, {b"gone": [b"copied"], b"gone-hash": [b"f"],
                                                    b"never-there": [b"x"], b"other-type": [b"y"]})
        assert result.unpatched == [b"other-type"] and result.members == 3
        assert result.copied == 0
        await close(syncer)

    asyncio.run(scenario())
    assert set(t.smembers("gone")) == {b"other"} and t.hgetall("gone-hash") == {b"g": b"2"}
    assert not t.exists("never-there") and t.get("other-type") == b"x"


def test_a_member_copy_that_read_the_key_gone_does_not_undo_a_later_copy_beside_it(source, target):
    """The order that would lose a write if a member copy deleted the key it found gone: p1's copy reads
    lb gone (its last member removed) and is slow to write; lb comes back with p2, whose copy runs
    beside it and writes p2; then p1's copy writes. p2 has no mark left: it must still be there."""
    c = source.client()
    c.zadd("lb", {"p1": 1})
    held = asyncio.Event()
    release = asyncio.Event()

    async def scenario() -> None:
        syncer = await make_syncer(source, target)
        assert syncer.pool is not None
        await syncer.copy_now(0, [b"lb"])
        first = syncer.pool._all

        def slow_first(write: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def gated(*args: Any) -> Any:
                if not held.is_set():        # the first write of any copy: p1's
                    held.set()
                    await release.wait()
                return await write(*args)
            return gated

        for mover in first:
            mover.dst.per_key = slow_first(mover.dst.per_key)  # type: ignore[method-assign]
        syncer.start()
        c.zrem("lb", "p1")                    # the last member: lb is gone on the source
        syncer.mark(0, [m("lb", "p1")])
        await asyncio.wait_for(held.wait(), 10)
        c.zadd("lb", {"p2": 2})                # lb is back, with p2
        syncer.mark(0, [m("lb", "p2")])
        await wait_for_async("p2 on the target", lambda: target.client().zscore("lb", "p2") == 2, 10)
        release.set()
        assert await syncer.drain(10)
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().zrange("lb", 0, -1, withscores=True) == [(b"p2", 2.0)]


def test_a_member_copy_that_removes_the_last_old_member_keeps_the_keys_expiry(source, target):
    """The target holds {old} with an expiry, the source {new} with the same one (new added, then old
    removed): the copy must add before it removes — removing first would empty the key, delete it, and
    the addition would create a new key without the expiry (found by the random test below)."""
    c, t = source.client(), target.client()
    c.zadd("z", {"new": 1})
    c.sadd("s", "new")
    c.hset("h", "new", "1")
    for key in ("z", "s", "h"):
        c.pexpire(key, 600_000)
    t.zadd("z", {"old": 1})
    t.sadd("s", "old")
    t.hset("h", "old", "1")
    for key in ("z", "s", "h"):
        t.pexpireat(key, c.pexpiretime(key))

    async def scenario() -> None:
        syncer = await make_syncer(source, target)
        assert syncer.pool is not None
        parts = {key: [b"old", b"new"] for key in (b"z", b"s", b"h")}    # the removal listed first
        result = await syncer.pool.move_members(0, parts)
        assert result.members == 6 and result.unpatched == []
        await close(syncer)

    asyncio.run(scenario())
    assert t.zrange("z", 0, -1) == [b"new"] and set(t.smembers("s")) == {b"new"}
    assert t.hgetall("h") == {b"new": b"1"}
    for key in ("z", "s", "h"):
        assert t.pexpiretime(key) == c.pexpiretime(key) > 0, key


async def slow_key_syncer(source: Any, target: Any, workers: int) -> tuple[Syncer, Copies]:
    """A syncer (not started) that copied the 20,000-member "lb" whole, chunked: a slow key it remembers;
    its copies from then on recorded."""
    src, dst = await discover(source.endpoint()), await discover(target.endpoint())
    pool = MoverPool(src, dst, size=workers, opts=MoverOptions(big_key_bytes=4096, chunk_elements=100))
    syncer = Syncer(pool, workers=workers)
    await syncer.copy_now(0, [b"lb"])
    assert syncer.expected_copy(KEY) > 0, "the whole copy was not slow enough to be remembered"
    return syncer, Copies(pool)


def test_a_slow_key_with_many_dirty_members_is_copied_in_parts_at_once_never_whole(source, target):
    """Past MEMBERS_PER_KEY dirty members a key whose whole copy is fast is copied whole; one whose whole
    copy is slow (here chunked) is not — that copy could not finish inside a cutover's drain — but its
    members are copied MEMBERS_PER_KEY at a time, the parts in flight together."""
    c = source.client()
    c.zadd("lb", {f"p{i}": i for i in range(20_000)})

    async def scenario() -> None:
        syncer, copies = await slow_key_syncer(source, target, 4)
        c.zadd("lb", {f"p{i}": -i for i in range(3000)})
        syncer.mark(0, [m("lb", f"p{i}") for i in range(3000)])
        assert syncer.dirty_members == 3000 and syncer._dirty[KEY] is not None
        syncer.start()
        assert await syncer.drain(30)
        assert sorted(len(members or ()) for _, members in copies.started) == [952, 1024, 1024]
        assert copies.overlapping_members >= 1 and copies.conflicts == []
        assert syncer.stats.members == 3000
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().zrange("lb", 0, -1, withscores=True) == c.zrange("lb", 0, -1, withscores=True)


def test_the_parts_of_a_slow_key_wait_their_turn_behind_other_keys(source, target):
    """A slow key's remaining members wait at the back: a key marked after them (here in another db,
    which a batch never mixes in) is copied after the first part, not after the last."""
    c = source.client()
    c.zadd("lb", {f"p{i}": i for i in range(20_000)})
    source.client(db=1).set("other", "x")

    async def scenario() -> None:
        syncer, copies = await slow_key_syncer(source, target, 1)
        syncer.mark(0, [m("lb", f"p{i}") for i in range(3000)])
        syncer.mark(1, [b"other"])
        syncer.start()
        assert await syncer.drain(30)
        assert [key for key, _ in copies.started] == [b"lb", b"other", b"lb", b"lb"]
        await close(syncer)

    asyncio.run(scenario())
    assert target.client(db=1).get("other") == b"x"


KEYS = [f"{kind}{i}" for kind in "zsh" for i in range(3)]


async def random_writes(client: avalkey.Valkey, rng: random.Random, ops: int, syncer: Syncer,
                        counts: dict[str, int]) -> None:
    """Member writes (most) and whole-key writes to a few small keys, each marked after its reply, as
    the proxy marks (member writes by member, the rest whole)."""
    members = [f"m{i}" for i in range(3)]    # few, added and removed as often: keys go empty and come back
    for _ in range(ops):
        key, member = rng.choice(KEYS), rng.choice(members)
        kind, roll = key[0], rng.random()
        if roll < 0.85:
            if kind == "z":
                await (client.zincrby(key, 1, member) if roll < 0.45 else client.zrem(key, member))
            elif kind == "s":
                await (client.sadd(key, member) if roll < 0.45 else client.srem(key, member))
            else:
                await (client.hincrby(key, member, 1) if roll < 0.45 else client.hdel(key, member))
            syncer.mark(0, [m(key, member)])
            counts["member"] += 1
        else:
            whole = rng.choice(["delete", "pexpire", "persist", "pop"])
            if whole == "delete":
                await client.delete(key)
            elif whole == "pexpire":
                await client.pexpire(key, rng.randrange(100_000, 900_000))
            elif whole == "persist":
                await client.persist(key)
            elif kind == "z":
                await client.zpopmin(key)
            elif kind == "s":
                await client.spop(key)
            else:
                await client.hset(key, mapping={m: "0" for m in members})  # marked whole: allowed too
            syncer.mark(0, [key.encode()])
            counts["whole"] += 1


async def differences(source: avalkey.Valkey, target: avalkey.Valkey) -> list[str]:
    """The keys whose type, expiry or content differ between the two sides."""
    async def state(client: avalkey.Valkey, key: str) -> tuple[Any, ...]:
        kind = await client.type(key)
        if kind == b"zset":
            content: Any = await client.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            content = sorted(await client.smembers(key))
        else:
            content = await client.hgetall(key)
        return kind, await client.pexpiretime(key), content
    found = []
    for key in KEYS:
        mine, theirs = await state(source, key), await state(target, key)
        if mine != theirs:
            found.append(f"{key}: source {mine}, target {theirs}")
    return found


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_member_and_whole_key_writes_with_copies_overlapping_end_equal(source, target, seed):
    """Four writers on a few small keys, in 200 short rounds; copies delayed at random (0-3 ms before
    they start and between their read and their write) so that they overlap in many orders. No copy
    overlaps one it must not, member copies of one key do overlap, and after each round, once the
    syncer drained, both sides hold the same keys: a wrong value cannot hide behind a later write."""
    rng = random.Random(seed)

    async def jitter() -> None:
        await asyncio.sleep(rng.random() * 0.003)

    def delayed(write: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def later(*args: Any) -> Any:
            await jitter()
            return await write(*args)
        return later

    async def scenario() -> dict[str, int]:
        syncer = await make_syncer(source, target)
        copies = Copies(syncer.pool, jitter)
        for mover in syncer.pool._all:   # and between a copy's read and its write: more orders still
            mover.dst.per_key = delayed(mover.dst.per_key)  # type: ignore[method-assign]
        syncer.start()
        counts = {"member": 0, "whole": 0}
        clients = [avalkey.Valkey(host="127.0.0.1", port=source.port) for _ in range(4)]
        src, dst = clients[0], avalkey.Valkey(host="127.0.0.1", port=target.port)
        try:
            for n in range(200):
                await asyncio.gather(*(random_writes(c, random.Random(rng.random()), 6, syncer, counts)
                                       for c in clients))
                assert await syncer.drain(30)
                assert copies.conflicts == []
                assert await differences(src, dst) == [], f"round {n}"
        finally:
            for c in (*clients, dst):
                await c.aclose()
            await close(syncer)
        assert copies.overlapping_members >= 50, copies.overlapping_members
        return counts

    counts = asyncio.run(scenario())
    assert counts["member"] > 3000 and counts["whole"] > 400, counts
