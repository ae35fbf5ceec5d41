"""A hot big key at cutover: the key-scoped hold (Proxy.hold_keys) and a migration that cuts over
while a sorted set too big to copy inside the write pause is written continuously."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import aiohttp
import pytest
import valkey.asyncio as avalkey

from durablecache.migration import Migration, MigrationOptions
from durablecache.proxy import Proxy
from durablecache.proxy.admin import AdminServer
from durablecache.proxyhandles import local_proxies
from durablecache.testing.waiting import wait_for_async
from durablecache.testing.workload import Workload
from durablecache.topology import discover
from durablecache.verify import Verifier

pytestmark = pytest.mark.timeout(90)


class Marks:
    """An on_marks callback that records what it got, optionally slowly (a slow syncer)."""

    def __init__(self) -> None:
        self.got: list[tuple[int, bytes]] = []
        self.delay = 0.0

    async def __call__(self, db: int, keys: list[bytes]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.got.extend((db, k) for k in keys)


def app(port: int) -> avalkey.Valkey:
    return avalkey.Valkey(host="127.0.0.1", port=port, socket_timeout=10)


def test_hold_keys_holds_only_writes_to_those_keys_in_order(source, target):
    async def scenario() -> None:
        marks = Marks()
        proxy = Proxy(source.endpoint(), on_marks=marks)
        await proxy.start()
        a, b, direct = app(proxy.port), app(proxy.port), source.client()
        try:
            await a.set("hot", "0")
            await proxy.hold_keys({(0, b"hot")}, 1.0)          # nothing in flight: returns at once
            # Client A: a held write, then (same connection) a write to another key and a read.
            pipe = a.pipeline(transaction=False)
            pipe.set("hot", "1").set("after", "x").get("after")
            held = asyncio.ensure_future(pipe.execute())
            # Client B: other keys are not held, and reads of the held key go on.
            assert await asyncio.wait_for(b.set("other", "1"), 2) is True
            assert await asyncio.wait_for(b.get("hot"), 2) == b"0"
            await wait_for_async("the write to the held key to be held", lambda: proxy.stats()["held"] >= 1, 2)
            assert not held.done()
            assert direct.get("hot") == b"0" and direct.get("after") is None   # order kept: "after" waits too
            assert proxy.stats()["held_keys"] == 1 and proxy.stats()["key_held_total"] >= 1
            # A write to the held key in another db is not held.
            await b.execute_command("SELECT", 1)
            assert await asyncio.wait_for(b.set("hot", "db1"), 2) is True
            proxy.release_keys()
            assert await asyncio.wait_for(held, 5) == [True, True, b"x"]
            assert direct.get("hot") == b"1"
            assert (0, b"hot") in marks.got and (0, b"after") in marks.got

            # hold_keys waits for writes to the keys already in flight, marks included ...
            marks.delay = 0.3
            marked = marks.got.count((0, b"hot"))
            write = asyncio.ensure_future(a.set("hot", "2"))
            await wait_for_async("the write in flight", lambda: proxy.stats()["inflight_writes"], 1)
            t0 = time.monotonic()
            await proxy.hold_keys({(0, b"hot")}, 2.0)
            assert time.monotonic() - t0 >= 0.15 and marks.got.count((0, b"hot")) == marked + 1
            assert await asyncio.wait_for(write, 2) is True     # its reply was sent: only our loop lags
            proxy.release_keys()
            # ... and says so when they do not finish in time (the keys stay held until released).
            marks.delay = 1.0
            slow = asyncio.ensure_future(a.set("hot", "3"))
            await wait_for_async("the slow write in flight", lambda: proxy.stats()["inflight_writes"], 1)
            with pytest.raises(TimeoutError):
                await proxy.hold_keys({(0, b"hot")}, 0.2)
            proxy.release_keys()
            assert await asyncio.wait_for(slow, 5) is True
            marks.delay = 0.0

            # A blocking write to a held key in flight would keep the hold from settling: it is ended
            # with its timeout reply (CLIENT UNBLOCK ... TIMEOUT), as at FREEZE.
            c = app(proxy.port)
            blocked = asyncio.ensure_future(c.blmove("empty-list", "hot-list", 20, "RIGHT", "LEFT"))
            await wait_for_async("the BLMOVE blocked upstream",
                                 lambda: any(x["cmd"] == "blmove" for x in direct.client_list()), 5)
            t0 = time.monotonic()
            await proxy.hold_keys({(0, b"hot-list")}, 3.0)
            assert time.monotonic() - t0 < 2.0
            assert await asyncio.wait_for(blocked, 2) is None
            await c.aclose()
            proxy.release_keys()

            # Held through a global FREEZE -> FLIP -> UNFREEZE: the held write goes to the new upstream.
            await proxy.hold_keys({(0, b"hot")}, 1.0)
            moved = asyncio.ensure_future(a.set("hot", "4"))
            await wait_for_async("the write to the held key to be held", lambda: proxy.stats()["held"] >= 1, 2)
            assert not moved.done()
            await proxy.freeze(1.0)
            await proxy.flip(target.endpoint())
            proxy.unfreeze()
            assert await asyncio.wait_for(b.set("free", "1"), 2) is True     # writes flow again ...
            assert not moved.done() and proxy.stats()["held"] >= 1    # ... but unfreeze does not end the key hold
            proxy.release_keys()
            assert await asyncio.wait_for(moved, 5) is True
            assert target.client().get("hot") == b"4" and direct.get("hot") == b"3"
        finally:
            for c in (a, b):
                await c.aclose()
            direct.close()
            await proxy.stop()

    asyncio.run(scenario())


def test_admin_hold_and_release(source):
    async def scenario() -> None:
        proxy = Proxy(source.endpoint(), on_marks=Marks())
        await proxy.start()
        admin = AdminServer(proxy, "tok")
        await admin.start()
        url = f"http://127.0.0.1:{admin.port}"
        headers = {"Authorization": "Bearer tok"}
        try:
            async with aiohttp.ClientSession(headers=headers) as http:
                body = {"keys": ["k\xff", [2, "x"]], "db": 1}
                async with http.post(f"{url}/hold?timeout=1", json=body) as r:
                    assert r.status == 200 and (await r.json())["held"] == 2
                assert proxy.key_hold == {1: {b"k\xff"}, 2: {b"x"}}
                async with http.post(f"{url}/hold", json={"keys": ["!!"], "encoding": "base64"}) as r:
                    assert r.status == 400
                async with http.post(f"{url}/hold", json={"keys": ["a2V5"], "encoding": "base64"}) as r:
                    assert r.status == 200
                assert proxy.key_hold[0] == {b"key"}
                async with http.post(f"{url}/release") as r:
                    assert r.status == 200
                assert proxy.key_hold == {}
        finally:
            await admin.stop()
            await proxy.stop()

    asyncio.run(scenario())


HOT_MEMBERS = 150_000   # ~45 ms per full copy here: more than the whole 20 ms write pause


async def hot_writer(port: int, stop: asyncio.Event, acked: collections.Counter[str], stats: dict[str, Any]) -> None:
    """ZINCRBY on the big sorted set as fast as one client goes; a ledger of acknowledged increments.
    Through a script: its declared key is marked whole (a plain ZINCRBY marks just the member, whose
    copy fits the write pause: tests/test_members.py), so every write makes the whole key dirty."""
    client = app(port)
    n = 0
    try:
        while not stop.is_set():
            member = f"player-{n % 1000}"
            t0 = time.monotonic()
            await client.eval("return redis.call('ZINCRBY', KEYS[1], 1, ARGV[1])", 1, "leaderboard", member)
            stats["max_latency"] = max(stats["max_latency"], time.monotonic() - t0)
            acked[member] += 1
            n += 1
    finally:
        await client.aclose()


@pytest.mark.timeout(120)
def test_cutover_while_a_hot_big_key_is_written(source, target):
    async def scenario() -> None:
        seed = source.client()
        for i in range(0, HOT_MEMBERS, 20_000):
            seed.zadd("leaderboard", {f"player-{j}": j for j in range(i, min(i + 20_000, HOT_MEMBERS))})
        initial = {f"player-{j}": float(j) for j in range(1000)}
        seed.close()
        load = Workload("127.0.0.1", source.port, writers=3, rate=150)
        load.start()
        stop_hot = asyncio.Event()
        acked: collections.Counter[str] = collections.Counter()
        hot_stats: dict[str, Any] = {"max_latency": 0.0}
        hot: asyncio.Task[None] | None = None
        events: list[dict[str, Any]] = []
        cut, ready = asyncio.Event(), asyncio.Event()

        def emit(e: dict[str, Any]) -> None:
            nonlocal hot
            events.append(e)
            if e["event"] == "proxies":
                host, port = e["addresses"][0].rsplit(":", 1)
                load.point_at(host, int(port))
                hot = asyncio.get_running_loop().create_task(hot_writer(int(port), stop_hot, acked, hot_stats))
            if e["event"] == "awaiting_approval":
                ready.set()
            if e["event"] == "cutover":
                cut.set()

        opts = MigrationOptions(cutover="manual", max_write_pause=0.02, max_key_pause=5.0, gate_settle=0.3,
                                gate_timeout=30, rollback_window=600, copy_concurrency=4, cutover_attempts=10)
        m = Migration(source.endpoint(), target.endpoint(), opts, local_proxies("127.0.0.1", 0), emit=emit)
        task = asyncio.create_task(m.run())
        try:
            await asyncio.wait([task, asyncio.create_task(ready.wait())], timeout=60,
                               return_when=asyncio.FIRST_COMPLETED)
            assert ready.is_set(), task.exception() if task.done() else "Sync not reached in 60 s"
            # Latencies from here on: the cutover, not the copy (which shares this test's event loop):
            # once every writer has had a write acknowledged in Sync, none is still waiting behind it.
            in_sync = [led.acked for led in load.ledgers]
            await wait_for_async("a write by every writer in Sync",
                                 lambda: all(led.acked > n for led, n in zip(load.ledgers, in_sync)), 10)
            for led in load.ledgers:
                led.max_latency = 0.0
            hot_stats["max_latency"] = 0.0
            m.approved.set()
            await asyncio.wait([task, asyncio.create_task(cut.wait())], timeout=60,
                               return_when=asyncio.FIRST_COMPLETED)
            assert cut.is_set(), (task.exception() if task.done() else "no cutover in 60 s",
                                  [e for e in events if e["event"].startswith("cutover")][-3:])
            assert hot is not None and not hot.done(), "the hot writer must still be writing at cutover"
            writes_at_cut = sum(acked.values())
            await wait_for_async("hot writes after the cutover", lambda: sum(acked.values()) > writes_at_cut + 20, 10)
            await load.writes_go_on(50, 30)     # writes go on after the cutover, now on the target
            stop_hot.set()
            await asyncio.wait_for(hot, 10)
            await load.finish()
            cutover = next(e for e in events if e["event"] == "cutover")
            assert m.syncer is not None
            # The premise: one full copy of the hot key does not fit the write pause ...
            assert m.syncer.expected_copy((0, b"leaderboard")) > opts.max_write_pause
            # ... so the cutover held that key alone first, then froze everything briefly.
            assert cutover["held_keys"] >= 1 and cutover["key_pause_ms"] > cutover["pause_ms"]
            assert sum(acked.values()) > writes_at_cut > 0      # writes before and after, no stop for it
            # Zero acknowledged writes lost: the normal load, and every acknowledged ZINCRBY.
            assert load.acked > 200
            assert load.lost(target.client()) == []
            expected = {member: initial[member] + count for member, count in acked.items()}
            scores = dict(zip(expected, target.client().zmscore("leaderboard", list(expected))))
            assert scores == expected, {k: (v, expected[k]) for k, v in scores.items() if v != expected[k]}
            assert target.client().zcard("leaderboard") == HOT_MEMBERS
            assert await m.syncer.drain(30)                   # reverse sync: the source catches up too
            report = await Verifier(await discover(source.endpoint()), await discover(target.endpoint())).run()
            assert report.equal
            # Only the hot key's writer waited for it: the other writers saw at most the global pause.
            normal_max = load.max_latency_ms
            hot_max = hot_stats["max_latency"] * 1000
            assert hot_max >= cutover["key_pause_ms"] * 0.5
            # Held with the hot key they would have waited about as long as its writer; what they do see
            # is the global pause (of this attempt, or of an aborted one) plus the servers' own
            # DUMP/RESTORE stalls of that key: they are spared a good part of the time the hot key alone
            # was held.
            held_alone = cutover["key_pause_ms"] - cutover["pause_ms"]
            global_pause = max(e["pause_ms"] for e in events if e["event"] in ("cutover", "cutover_aborted"))
            assert normal_max < global_pause + 0.5 * held_alone, (normal_max, hot_max, cutover)
            print(f"\nhot key cutover: key pause {cutover['key_pause_ms']} ms, global pause "
                  f"{cutover['pause_ms']} ms, hot writer max {hot_max:.1f} ms, others max {normal_max:.1f} ms, "
                  f"aborted attempts {sum(e['event'] == 'cutover_aborted' for e in events)}")
        finally:
            stop_hot.set()
            if hot is not None and not hot.done():
                hot.cancel()
            if not load.stop.is_set():
                await load.finish()
            m.stop_requested.set()
            await asyncio.wait_for(task, 30)

    asyncio.run(scenario())
