"""The bulk copy's path through the syncer (Syncer.copy_now): keys nobody waits to copy are claimed
as in flight and copied by the caller as one batch; the syncer's invariant still holds for them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from durablecache.errors import ConnectError
from durablecache.keymover import MoverOptions
from durablecache.movers import MoverPool
from durablecache.syncer import Syncer
from durablecache.testing.waiting import wait_for_async
from durablecache.topology import discover


async def idle_syncer(source, target, **kwargs) -> Syncer:  # type: ignore[no-untyped-def]
    """A syncer whose workers are not running: only copy_now's own batches copy anything."""
    src, dst = await discover(source.endpoint()), await discover(target.endpoint())
    # A tiny big-key threshold makes a big key's copy chunked and slow enough to catch it in flight.
    pool = MoverPool(src, dst, size=4, opts=MoverOptions(big_key_bytes=1024, chunk_elements=50))
    return Syncer(pool, workers=2, **kwargs)


async def until(what: str, probe: Callable[[], bool], timeout: float = 20.0) -> None:
    """Polled every millisecond: some of these states last only as long as one batch's copy."""
    await wait_for_async(what, probe, timeout, interval=0.001)


async def close(syncer: Syncer) -> None:
    await syncer.stop()
    await syncer.close_pools(current=True)


def test_bulk_keys_are_copied_without_the_workers_and_count_as_in_flight(source, target):
    c = source.client()
    for i in range(300):
        c.set(f"s{i}", f"v{i}")
    c.hset("h", mapping={f"f{i}": "v" for i in range(3000)})
    keys = [b"h", *(f"s{i}".encode() for i in range(300))]

    async def scenario() -> None:
        syncer = await idle_syncer(source, target)
        copy = asyncio.create_task(syncer.copy_now(0, keys, frozenset(keys[1:])))
        await until("the bulk batch in flight", lambda: syncer.pending((0, b"h")))
        assert syncer.backlog == len(keys)          # a drain waits for them, as for a worker's batch
        result = await asyncio.wait_for(copy, 30)
        assert result.copied == len(keys)
        assert syncer.empty() and syncer.stats.copied == len(keys) and syncer.stats.batches == 1
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().dbsize() == 301
    assert target.client().hlen("h") == 3000


def test_a_key_marked_while_its_bulk_copy_is_in_flight_is_copied_again(source, target):
    c = source.client()
    c.hset("h", mapping={f"f{i}": "old" for i in range(20_000)})

    async def scenario() -> None:
        syncer = await idle_syncer(source, target)
        copy = asyncio.create_task(syncer.copy_now(0, [b"h"]))
        await until("the bulk copy of h in flight", lambda: syncer.copying((0, b"h")))
        c.hset("h", "f0", "new")      # a live write during the bulk copy ...
        syncer.mark(0, [b"h"])        # ... and its mark
        await asyncio.wait_for(copy, 60)
        assert syncer.pending((0, b"h")), "the mark must leave h dirty after the bulk copy"
        syncer.start()
        assert await syncer.drain(60)
        assert syncer.stats.batches == 2
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().hget("h", "f0") == b"new"
    assert target.client().hlen("h") == 20_000


def test_keys_already_dirty_are_left_to_the_workers_and_waited_for(source, target):
    c = source.client()
    c.set("dirty", "1")
    c.set("free", "2")

    async def scenario() -> None:
        syncer = await idle_syncer(source, target)
        syncer.mark(0, [b"dirty"])     # a live write's mark, not copied yet (no workers)
        copy = asyncio.create_task(syncer.copy_now(0, [b"dirty", b"free"]))
        await until("the free key copied", lambda: target.client().get("free") == b"2")
        await until("the bulk batch finished", lambda: syncer.stats.batches == 1)
        assert not copy.done(), "copy_now returned before the dirty key was copied"
        assert target.client().get("dirty") is None
        syncer.start()
        result = await asyncio.wait_for(copy, 30)
        assert result.copied == 2
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().get("dirty") == b"1"


def test_a_failed_bulk_batch_is_retried_by_the_workers(source, target):
    c = source.client()
    c.set("a", "1")
    c.set("b", "2")

    async def scenario() -> None:
        syncer = await idle_syncer(source, target)
        real, calls = syncer.pool.move, []

        async def flaky(db, keys, strings=frozenset()):  # type: ignore[no-untyped-def]
            calls.append(list(keys))
            if len(calls) == 1:
                raise ConnectError("simulated connection drop")
            return await real(db, keys, strings)

        syncer.pool.move = flaky  # type: ignore[method-assign]
        syncer.start()
        result = await asyncio.wait_for(syncer.copy_now(0, [b"a", b"b"]), 30)
        assert result.copied == 2
        assert len(calls) >= 2 and sorted(calls[1]) == [b"a", b"b"]   # the workers' retry
        assert syncer.empty()
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().mget("a", "b") == [b"1", b"2"]


def test_a_cancelled_bulk_copy_leaves_its_keys_dirty(source, target):
    c = source.client()
    c.hset("h", mapping={f"f{i}": "v" for i in range(20_000)})

    async def scenario() -> None:
        syncer = await idle_syncer(source, target)
        copy = asyncio.create_task(syncer.copy_now(0, [b"h"]))
        await until("the bulk copy of h in flight", lambda: syncer.copying((0, b"h")))
        copy.cancel()
        await asyncio.gather(copy, return_exceptions=True)
        assert (0, b"h") in syncer._dirty and not syncer.copying((0, b"h"))
        syncer.start()
        assert await syncer.drain(60)
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().hlen("h") == 20_000
