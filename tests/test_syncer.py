"""The syncer's invariant: one owner per key, a key re-marked during its copy is copied again."""

from __future__ import annotations

import asyncio

from durablecache.keymover import MoverOptions
from durablecache.movers import MoverPool
from durablecache.syncer import Syncer
from durablecache.testing.waiting import wait_for_async
from durablecache.topology import discover


async def make_syncer(source, target, **kwargs) -> Syncer:
    src, dst = await discover(source.endpoint()), await discover(target.endpoint())
    # A tiny big-key threshold makes copies chunked and slow enough to catch one in flight.
    pool = MoverPool(src, dst, size=2, opts=MoverOptions(big_key_bytes=1024, chunk_elements=50))
    kwargs.setdefault("workers", 2)
    syncer = Syncer(pool, **kwargs)
    syncer.start()
    return syncer


def test_key_marked_while_its_copy_is_in_flight_is_copied_again(source, target):
    c = source.client()
    c.hset("h", mapping={f"f{i}": "old" for i in range(20_000)})

    async def scenario() -> None:
        syncer = await make_syncer(source, target)
        syncer.mark(0, [b"h"])
        await wait_for_async("the copy in flight", lambda: (0, b"h") in syncer._in_flight, 2)
        c.hset("h", "f0", "new")  # a write during the copy ...
        syncer.mark(0, [b"h"])  # ... and its mark
        assert await syncer.drain(60)
        assert syncer.stats.batches >= 2
        await syncer.stop()
        await syncer.pool.close()

    asyncio.run(scenario())
    assert target.client().hget("h", "f0") == b"new"
    assert target.client().hlen("h") == 20_000


def test_deleted_key_is_deleted_on_the_other_side(source, target):
    target.client().set("gone", "stale")

    async def scenario() -> None:
        syncer = await make_syncer(source, target)
        syncer.mark(0, [b"gone"])
        assert await syncer.drain(10)
        await syncer.stop()
        await syncer.pool.close()

    asyncio.run(scenario())
    assert target.client().exists("gone") == 0


def test_overflow_demands_a_repair_and_bulk_copy_never_overflows(source, target):
    c = source.client()
    for i in range(200):
        c.set(f"k{i}", i)

    async def scenario() -> None:
        syncer = await make_syncer(source, target, max_dirty=50)
        await syncer.stop()  # no workers: marks pile up
        syncer.mark(0, [f"k{i}".encode() for i in range(60)])
        assert syncer.repair_reason and "exceeded 50" in syncer.repair_reason
        assert syncer.stats.overflowed == 10
        syncer.repair_reason = None
        syncer._dirty.clear()
        syncer.start()
        for i in range(0, 200, 20):  # the bulk path waits for room instead of overflowing
            await syncer.copy_now(0, [f"k{j}".encode() for j in range(i, i + 20)])
        assert syncer.repair_reason is None
        await syncer.stop()
        await syncer.pool.close()

    asyncio.run(scenario())
    assert target.client().dbsize() == 200


def test_mark_rejects_a_single_key():
    syncer = Syncer.__new__(Syncer)
    try:
        Syncer.mark(syncer, 0, b"key")
    except TypeError:
        return
    raise AssertionError("a bare key must not be iterated byte by byte")


def test_a_failing_batch_is_retried_and_waits_stay_bounded(source, target):
    """A transient failure (a dropped connection) is retried; drain() never spins past its timeout
    and copy_now() returns only once every one of its keys was really copied."""
    import time

    from durablecache.errors import ConnectError

    c = source.client()
    c.set("a", "1")
    c.set("b", "2")

    async def scenario() -> None:
        syncer = await make_syncer(source, target, workers=1)
        real, calls = syncer._move, []

        async def flaky(batch):  # type: ignore[no-untyped-def]
            calls.append(batch)
            if len(calls) == 1:
                raise ConnectError("simulated connection drop")
            return await real(batch)

        syncer._move = flaky  # type: ignore[method-assign]
        syncer.mark(0, [b"a"])
        t0 = time.monotonic()
        assert await syncer.drain(0.3) is False  # the retry comes after 1 s: not drained yet ...
        assert time.monotonic() - t0 < 0.95  # ... and the wait ended on time, before that retry
        assert await syncer.drain(10)
        # A bulk copy afterwards takes its own path (a failing one: tests/test_bulk_sync.py).
        await asyncio.wait_for(syncer.copy_now(0, [b"a", b"b"]), 10)
        assert target.client().get("b") == b"2"
        await syncer.stop()
        await syncer.pool.close()

    asyncio.run(scenario())
    assert target.client().get("a") == b"1"


def test_a_switched_pool_is_closed_only_when_asked(source, target):
    """The cutover switches pools while writes are frozen and closes the old one after they resume:
    switch_pool() must not close it, close_pools() must."""
    source.client().set("k", "v")

    def syncer_connections() -> set[str]:
        return {c["id"] for c in source.client().client_list() if c["name"].startswith("durablecache")}

    async def scenario() -> None:
        syncer = await make_syncer(source, target)
        syncer.mark(0, [b"k"])
        assert await syncer.drain(10)
        opened = syncer_connections()
        assert opened
        src, dst = await discover(source.endpoint()), await discover(target.endpoint())
        syncer.switch_pool(MoverPool(dst, src, size=2, opts=MoverOptions()))
        syncer.mark(0, [b"k"])
        assert await syncer.drain(10)                  # the syncer went on, with the new pool ...
        assert opened <= syncer_connections()          # ... and left the old one open (writes would be frozen)
        await syncer.close_pools()
        await wait_for_async("the old pool's connections to close", lambda: not opened & syncer_connections(), 2)
        await syncer.stop()
        await syncer.close_pools(current=True)

    asyncio.run(scenario())
