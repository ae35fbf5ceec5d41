"""Member-level marks in the syncer and in a migration: only the marked members are copied (value,
score, field TTL or absence), a key whose existence or expiry changed is copied whole, a whole-key
mark supersedes members, members count toward the dirty-set bound; and no acknowledged write is lost
under ZINCRBY/HINCRBY/SADD+SREM load on big keys mixed with whole-key writes to the same keys, with a
cutover in the middle."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import pytest
import valkey.asyncio as avalkey

from durablecache.keymover import MoverOptions
from durablecache.migration import Migration, MigrationOptions
from durablecache.movers import MoverPool
from durablecache.ports import free_port
from durablecache.proxy.members import MemberMark
from durablecache.proxyhandles import local_proxies, subprocess_proxies
from durablecache.syncer import MEMBERS_PER_KEY, Syncer
from durablecache.testing.waiting import wait_for_async
from durablecache.topology import discover
from durablecache.verify import Verifier

pytestmark = pytest.mark.timeout(120)


def m(key: str, member: str) -> MemberMark:
    return MemberMark.of(key.encode(), member.encode())


async def make_syncer(source: Any, target: Any, *, start: bool = True, **kwargs: Any) -> Syncer:
    src, dst = await discover(source.endpoint()), await discover(target.endpoint())
    pool = MoverPool(src, dst, size=2, opts=MoverOptions(big_key_bytes=4096, chunk_elements=100))
    syncer = Syncer(pool, workers=2, **kwargs)
    if start:
        syncer.start()
    return syncer


async def close(syncer: Syncer) -> None:
    await syncer.stop()
    await syncer.pool.close()


async def copy_whole(syncer: Syncer, *keys: str) -> None:
    await syncer.copy_now(0, [k.encode() for k in keys])


def test_member_marks_copy_just_those_members(source, target):
    c, t = source.client(), target.client()
    c.zadd("z", {f"p{i}": i for i in range(2000)})
    c.sadd("s", *[f"m{i}" for i in range(2000)])
    c.hset("h", mapping={f"f{i}": i for i in range(2000)})
    c.pexpire("h", 600_000)

    async def scenario() -> None:
        syncer = await make_syncer(source, target)
        await copy_whole(syncer, "z", "s", "h")
        batches, copied = syncer.stats.batches, syncer.stats.copied
        c.zincrby("z", 5, "p1")
        c.zrem("z", "p2")
        c.zadd("z", {"new": -1.5e300})
        c.srem("s", "m1")
        c.sadd("s", "added")
        c.hincrby("h", "f1", 7)
        c.hdel("h", "f2")
        c.hset("h", "fresh", "")
        # Unmarked differences on the target stay: proof that only the marked members were copied.
        t.zadd("z", {"p3": -7})
        t.srem("s", "m3")
        t.hset("h", "f3", "tampered")
        syncer.mark(0, [m("z", "p1"), m("z", "p2"), m("z", "new"), m("s", "m1"), m("s", "added"),
                        m("h", "f1"), m("h", "f2"), m("h", "fresh")])
        assert await syncer.drain(10)
        assert syncer.stats.members == 8 and syncer.stats.copied == copied
        assert syncer.stats.batches > batches
        await close(syncer)

    asyncio.run(scenario())
    assert t.zscore("z", "p1") == 6 and t.zscore("z", "p2") is None and t.zscore("z", "new") == -1.5e300
    assert t.zscore("z", "p3") == -7 and t.zcard("z") == 2000
    assert not t.sismember("s", "m1") and t.sismember("s", "added") and not t.sismember("s", "m3")
    assert t.hget("h", "f1") == b"8" and t.hget("h", "f2") is None and t.hget("h", "fresh") == b""
    assert t.hget("h", "f3") == b"tampered" and t.pexpiretime("h") == c.pexpiretime("h")


def test_hash_field_expiries_are_copied_with_their_fields(make_server):
    source, target = make_server(engine="valkey9"), make_server(engine="valkey9")
    c, t = source.client(), target.client()
    c.hset("h", mapping={f"f{i}": i for i in range(100)})
    c.execute_command("HPEXPIRE", "h", 600_000, "FIELDS", 2, "f1", "f2")

    async def scenario() -> None:
        syncer = await make_syncer(source, target)
        await copy_whole(syncer, "h")
        assert field_expiries(t, ["f1"]) == field_expiries(c, ["f1"]) != [-1]
        c.execute_command("HPERSIST", "h", "FIELDS", 1, "f1")   # the field keeps its value, loses its TTL
        c.execute_command("HPEXPIRE", "h", 900_000, "FIELDS", 1, "f3")
        c.execute_command("HSETEX", "h", "PX", 700_000, "FIELDS", 1, "f4", "v4")
        c.hset("h", "f2", "plain")                             # HSET drops the field's TTL
        syncer.mark(0, [m("h", "f1"), m("h", "f2"), m("h", "f3"), m("h", "f4")])
        assert await syncer.drain(10)
        assert syncer.stats.members == 4
        await close(syncer)

    asyncio.run(scenario())
    fields = [f"f{i}" for i in range(6)]
    assert field_expiries(t, fields) == field_expiries(c, fields)
    assert field_expiries(c, fields)[1:5] == [-1, -1, field_expiries(c, ["f3"])[0], field_expiries(c, ["f4"])[0]]
    assert min(field_expiries(c, ["f3", "f4"])) > 0
    assert t.hmget("h", fields) == c.hmget("h", fields)


def test_a_target_that_refuses_scripts_gets_whole_copies(source, target):
    c = source.client()
    c.zadd("z", {f"p{i}": i for i in range(100)})
    target.client().execute_command("ACL", "SETUSER", "default", "-eval")

    async def scenario() -> None:
        syncer = await make_syncer(source, target)
        await copy_whole(syncer, "z")
        c.zincrby("z", 5, "p1")
        syncer.mark(0, [m("z", "p1")])
        assert await syncer.drain(10)
        assert syncer.stats.members == 0 and syncer.stats.copied == 2 and syncer.failure is None
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().zscore("z", "p1") == 6


def field_expiries(client: Any, fields: list[str]) -> list[int]:
    return list(client.execute_command("HPEXPIRETIME", "h", "FIELDS", len(fields), *fields))


def test_a_key_whose_existence_or_expiry_changed_is_copied_whole(source, target):
    c, t = source.client(), target.client()
    c.sadd("recreated", *[f"old{i}" for i in range(50)])
    c.pexpire("recreated", 3_600_000)
    c.sadd("emptied", "only")
    c.zadd("expiring", {"a": 1, "b": 2})
    c.sadd("gone", "x")

    async def scenario() -> None:
        syncer = await make_syncer(source, target)
        await copy_whole(syncer, "recreated", "emptied", "expiring", "gone")
        c.delete("recreated")          # as if it expired here first: no mark of its own
        c.sadd("recreated", "new")
        c.srem("emptied", "only")      # the last member: the key goes
        c.pexpire("expiring", 500_000)  # its expiry changed unmarked; the member write must not hide it
        c.zadd("expiring", {"c": 3})
        c.delete("gone")
        syncer.mark(0, [m("recreated", "new"), m("emptied", "only"), m("expiring", "c"), m("gone", "x")])
        assert await syncer.drain(10)
        await close(syncer)

    asyncio.run(scenario())
    assert set(t.smembers("recreated")) == {b"new"} and t.pexpiretime("recreated") == -1
    assert not t.exists("emptied") and not t.exists("gone")
    assert t.zrange("expiring", 0, -1) == [b"a", b"b", b"c"] and t.pexpiretime("expiring") == c.pexpiretime("expiring")


def test_a_whole_key_mark_supersedes_members_and_marks_during_a_copy_wait_for_the_next(source, target):
    c = source.client()
    c.zadd("big", {f"p{i}": i for i in range(20_000)})    # chunked (big_key_bytes=4096): a slow copy

    async def scenario() -> None:
        syncer = await make_syncer(source, target, start=False)
        syncer.mark(0, [m("big", "p1"), m("big", "p2")])
        assert syncer.dirty_members == 2 and syncer.backlog == 1
        syncer.mark(0, [b"big"])
        assert syncer.dirty_members == 0 and syncer._dirty[(0, b"big")] is None
        syncer.mark(0, [m("big", "p3")])              # absorbed by the whole copy to come
        assert syncer.dirty_members == 0
        syncer.start()
        big = (0, b"big")
        await wait_for_async("the whole copy in flight", lambda: syncer._whole_pending(big) and syncer.copying(big), 5)
        c.zincrby("big", 100, "p19999")                  # written while the copy runs ...
        syncer.mark(0, [m("big", "p19999")])             # ... its mark waits for the next copy
        assert syncer._again[(0, b"big")] == {b"p19999"} and (0, b"big") not in syncer._dirty
        assert await syncer.drain(30)
        assert syncer.stats.members >= 1
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().zscore("big", "p19999") == 20_099
    assert target.client().zcard("big") == 20_000


def test_members_count_toward_the_dirty_bound_and_a_key_with_too_many_is_copied_whole(source, target):
    async def scenario() -> None:
        syncer = await make_syncer(source, target, start=False, max_dirty=10)
        syncer.mark(0, [m("a", f"x{i}") for i in range(4)])       # 1 key + 4 members
        syncer.mark(0, [m("b", f"y{i}") for i in range(4)])       # 2 keys + 8 members: 10, the bound
        assert syncer.dirty_members == 8 and syncer.repair_reason is None
        syncer.mark(0, [m("b", "y4")])                            # no room: b is copied whole instead
        assert syncer._dirty[(0, b"b")] is None and syncer.dirty_members == 4
        syncer.mark(0, [f"k{i}".encode() for i in range(4)])      # 6 keys + 4 members: 10
        assert syncer.repair_reason is None
        syncer.mark(0, [b"one-too-many"])                         # a new key past the bound: overflow
        assert syncer.repair_reason and "exceeded 10" in syncer.repair_reason
        assert syncer.stats.overflowed == 1
        big = await make_syncer(source, target, start=False)
        big.mark(0, [m("c", f"z{i}") for i in range(MEMBERS_PER_KEY + 1)])
        assert big._dirty[(0, b"c")] is None and big.dirty_members == 0
        await close(syncer)
        await close(big)

    asyncio.run(scenario())


# ---- a migration under load ---------------------------------------------------------------------

BIG = 50_000


def seed_big_keys(source: Any) -> None:
    c = source.client()
    for i in range(0, BIG, 10_000):
        c.zadd("lb", {f"p{j}": j for j in range(i, i + 10_000)})
        c.hset("h", mapping={f"f{j}": 0 for j in range(i, i + 10_000)})
        c.sadd("s", *[f"m{j}" for j in range(i, i + 10_000)])
    c.zadd("lb", {f"junk{j}": -1 - j for j in range(500)})
    c.close()


class Ledger:
    """What the writers had acknowledged: increments per member, and the set's expected members."""

    def __init__(self) -> None:
        self.zincr: collections.Counter[str] = collections.Counter()
        self.hincr: collections.Counter[str] = collections.Counter()
        self.present: dict[str, bool] = {}
        self.writes = 0


async def member_writer(port: int, stop: asyncio.Event, ledger: Ledger) -> None:
    """ZINCRBY, HINCRBY, SADD + SREM on the big keys, as fast as one client goes."""
    client = avalkey.Valkey(host="127.0.0.1", port=port, socket_timeout=30)
    n = 0
    try:
        while not stop.is_set():
            await client.zincrby("lb", 1, f"p{n % 500}")
            ledger.zincr[f"p{n % 500}"] += 1
            await client.hincrby("h", f"f{n % 500}", 1)
            ledger.hincr[f"f{n % 500}"] += 1
            await client.sadd("s", f"w{n}")
            ledger.present[f"w{n}"] = True
            if n >= 3:
                await client.srem("s", f"w{n - 3}")
                ledger.present[f"w{n - 3}"] = False
            ledger.writes += 4
            n += 1
    finally:
        await client.aclose()


async def whole_key_writer(port: int, stop: asyncio.Event, ledger: Ledger) -> None:
    """Writes to the same keys that mark them whole: scripts (their declared keys), a range removal."""
    client = avalkey.Valkey(host="127.0.0.1", port=port, socket_timeout=30)
    n = 0
    try:
        while not stop.is_set():
            member = f"p{n % 500}"          # the very members the member writer increments
            await client.eval("return redis.call('ZINCRBY', KEYS[1], 1, ARGV[1])", 1, "lb", member)
            ledger.zincr[member] += 1
            await client.eval("return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)", 1, "h", f"f{n % 500}")
            ledger.hincr[f"f{n % 500}"] += 1
            if n < 500:
                await client.zremrangebyscore("lb", -1 - n, -1 - n)    # junk{n}
            await client.eval("return redis.call('SREM', KEYS[1], ARGV[1])", 1, "s", f"m{n}")
            ledger.present[f"m{n}"] = False
            n += 1
            await asyncio.sleep(0.2)     # a whole copy of these keys takes tens of ms: leave room
    finally:
        await client.aclose()


def check_ledger(server: Any, ledger: Ledger) -> None:
    c = server.client()
    zs = dict(zip(ledger.zincr, c.zmscore("lb", list(ledger.zincr))))
    want = {p: int(p[1:]) + n for p, n in ledger.zincr.items()}
    assert zs == want, {p: (zs[p], want[p]) for p in want if zs[p] != want[p]}
    hs = dict(zip(ledger.hincr, c.hmget("h", list(ledger.hincr))))
    assert {f: int(v) for f, v in hs.items()} == dict(ledger.hincr)
    members = list(ledger.present)
    got = dict(zip(members, (bool(x) for x in c.smismember("s", members))))
    assert got == ledger.present, [k for k in members if got[k] != ledger.present[k]][:10]


@pytest.mark.parametrize("proxy_mode", ["local", "subprocess"])
def test_no_acknowledged_member_write_is_lost_across_a_cutover_with_mixed_whole_key_writes(source, target, proxy_mode):
    """Subprocess: the member marks travel in MARK frames to the syncer's MarkServer."""
    async def scenario() -> None:
        seed_big_keys(source)
        ledger, stop = Ledger(), asyncio.Event()
        writers: list[asyncio.Task[None]] = []
        events: list[dict[str, Any]] = []
        cut, ready = asyncio.Event(), asyncio.Event()

        def emit(e: dict[str, Any]) -> None:
            events.append(e)
            if e["event"] == "proxies":
                port = int(e["addresses"][0].rsplit(":", 1)[1])
                loop = asyncio.get_running_loop()
                writers.append(loop.create_task(member_writer(port, stop, ledger)))
                writers.append(loop.create_task(whole_key_writer(port, stop, ledger)))
            if e["event"] == "awaiting_approval":
                ready.set()
            if e["event"] == "cutover":
                cut.set()

        opts = MigrationOptions(cutover="manual", gate_settle=0.3, gate_timeout=30, rollback_window=600,
                                cutover_attempts=20)
        owned: list[Any] = []
        if proxy_mode == "local":
            starter = local_proxies("127.0.0.1", 0)
        else:
            starter, owned = subprocess_proxies("127.0.0.1", free_port(), emit)   # it cannot report port 0
        mig = Migration(source.endpoint(), target.endpoint(), opts, starter, emit=emit)
        task = asyncio.create_task(mig.run())
        try:
            await asyncio.wait([task, asyncio.create_task(ready.wait())], timeout=60,
                               return_when=asyncio.FIRST_COMPLETED)
            assert ready.is_set(), task.exception() if task.done() else "Sync not reached in 60 s"
            assert mig.syncer is not None
            await wait_for_async("over 100 member marks", lambda: mig.syncer.stats.members > 100, 30,
                                 describe=lambda: (mig.syncer.stats, [w.exception() for w in writers if w.done()],
                                                   ledger.writes))
            mig.approved.set()
            await asyncio.wait([task, asyncio.create_task(cut.wait())], timeout=60,
                               return_when=asyncio.FIRST_COMPLETED)
            assert cut.is_set(), [e for e in events if e["event"].startswith("cutover")][-3:]
            assert all(not w.done() for w in writers), "the writers must still be writing at cutover"
            at_cut = ledger.writes
            await wait_for_async("400 more writes, on the target", lambda: ledger.writes > at_cut + 400, 30)
            stop.set()
            await asyncio.gather(*writers)
            check_ledger(target, ledger)                     # the target is authoritative now
            assert await mig.syncer.drain(30)                # reverse sync: the source catches up
            check_ledger(source, ledger)
            report = await Verifier(await discover(source.endpoint()), await discover(target.endpoint())).run()
            assert report.equal, report
            assert mig.syncer.stats.members > 0
        finally:
            stop.set()
            mig.stop_requested.set()
            await asyncio.wait_for(asyncio.gather(task, *writers, return_exceptions=True), 30)
            for thing in owned:
                await thing.stop()

    asyncio.run(scenario())


def test_a_hot_big_sorted_set_under_zincrby_cuts_over_with_the_default_write_pause(source, target):
    """The leaderboard case: no key hold is needed any more, the first attempt fits the write pause."""
    async def scenario() -> None:
        c = source.client()
        for i in range(0, 200_000, 20_000):
            c.zadd("lb", {f"p{j}": j for j in range(i, i + 20_000)})
        c.close()
        ledger, stop = Ledger(), asyncio.Event()
        writers: list[asyncio.Task[None]] = []
        events: list[dict[str, Any]] = []
        cut, ready = asyncio.Event(), asyncio.Event()

        async def zincrby(port: int) -> None:
            client = avalkey.Valkey(host="127.0.0.1", port=port, socket_timeout=30)
            n = 0
            while not stop.is_set():
                await client.zincrby("lb", 1, f"p{n % 1000}")
                ledger.zincr[f"p{n % 1000}"] += 1
                n += 1
            await client.aclose()

        def emit(e: dict[str, Any]) -> None:
            events.append(e)
            if e["event"] == "proxies":
                writers.append(asyncio.get_running_loop().create_task(
                    zincrby(int(e["addresses"][0].rsplit(":", 1)[1]))))
            if e["event"] == "awaiting_approval":
                ready.set()
            if e["event"] == "cutover":
                cut.set()

        opts = MigrationOptions(cutover="manual", gate_settle=0.3, gate_timeout=30, rollback_window=600)
        mig = Migration(source.endpoint(), target.endpoint(), opts, local_proxies("127.0.0.1", 0), emit=emit)
        task = asyncio.create_task(mig.run())
        try:
            await asyncio.wait([task, asyncio.create_task(ready.wait())], timeout=60,
                               return_when=asyncio.FIRST_COMPLETED)
            assert ready.is_set() and mig.syncer is not None
            await wait_for_async("over 100 member marks", lambda: mig.syncer.stats.members > 100, 30)
            # Once the copy's whole-key marks are a second old, member marks alone keep it dirty: it is
            # no longer a key whose copy does not fit the write pause.
            await wait_for_async("no slow key left", lambda: not mig.syncer.slow_keys(opts.max_write_pause / 2), 10,
                                 describe=lambda: (mig.syncer._copy_time, mig.syncer._slow_marked, time.monotonic()))
            mig.approved.set()
            await asyncio.wait([task, asyncio.create_task(cut.wait())], timeout=60,
                               return_when=asyncio.FIRST_COMPLETED)
            assert cut.is_set(), [e for e in events if e["event"].startswith("cutover")][-3:]
            assert not writers[0].done()
            cutover = next(e for e in events if e["event"] == "cutover")
            assert cutover["held_keys"] == 0 and cutover["attempt"] <= 3, cutover
            stop.set()
            await asyncio.gather(*writers)
            want = {p: int(p[1:]) + n for p, n in ledger.zincr.items()}
            got = dict(zip(want, target.client().zmscore("lb", list(want))))
            assert got == want
        finally:
            stop.set()
            mig.stop_requested.set()
            await asyncio.wait_for(asyncio.gather(task, *writers, return_exceptions=True), 30)

    asyncio.run(scenario())
