"""The bulk copy's path through the syncer (Syncer.copy_now): keys nobody waits to copy are claimed
as in flight a batch at a time and copied by the caller as one batch; the syncer's invariant still
holds for them — one copy of a key at a time, and a key marked during its copy is copied again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from durablecache.errors import ConnectError
from durablecache.keymover import MoverOptions
from durablecache.movers import MoverPool
from durablecache.proxy.members import MemberMark
from durablecache.syncer import Syncer
from durablecache.testing.waiting import wait_for_async
from durablecache.topology import discover


async def idle_syncer(source, target, **kwargs) -> Syncer:  # type: ignore[no-untyped-def]
    """A syncer whose workers are not running: only copy_now's own batches copy anything."""
    src, dst = await discover(source.endpoint()), await discover(target.endpoint())
    # A tiny big-key threshold makes a big key's copy chunked and slow enough to catch it in flight.
    pool = MoverPool(src, dst, size=4, opts=MoverOptions(big_key_bytes=1024, chunk_elements=50))
    kwargs.setdefault("workers", 2)
    return Syncer(pool, **kwargs)


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


# others: more dirty keys than the batch has, so that the claim looks the batch up in the dirty
# table rather than the table through the batch (Syncer._workers_hold's two ways).
@pytest.mark.parametrize("others", [0, 50])
def test_keys_already_dirty_are_left_to_the_workers_and_waited_for(source, target, others):
    c = source.client()
    c.set("dirty", "1")
    c.set("free", "2")

    async def scenario() -> None:
        syncer = await idle_syncer(source, target)
        syncer.mark(0, [b"dirty", *(f"other{i}".encode() for i in range(others))])  # live marks, no workers yet
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


def test_a_key_listed_by_two_bulk_batches_at_once_waits_for_the_first_copy(source, target):
    """SCAN may list a key twice (a rehash between two steps): the second batch must not copy it while
    the first does — its copy waits until the first ends, and then copies what the key became."""
    c = source.client()
    c.hset("h", mapping={f"f{i}": "old" for i in range(20_000)})
    c.set("x", "1")

    async def scenario() -> None:
        syncer = await idle_syncer(source, target)
        first = asyncio.create_task(syncer.copy_now(0, [b"h"]))
        await until("the first bulk copy of h in flight", lambda: syncer.copying((0, b"h")))
        second = asyncio.create_task(syncer.copy_now(0, [b"h", b"x"]))
        await until("x copied by the second batch", lambda: target.client().get("x") == b"1")
        c.hset("h", "f0", "new")     # written while the first copy runs: no mark, the listing must do
        await asyncio.wait_for(first, 60)
        assert not second.done(), "the second listing of h returned without a copy after the first"
        assert syncer.pending((0, b"h")) and not syncer.copying((0, b"h"))   # dirty: a worker's now
        syncer.start()
        result = await asyncio.wait_for(second, 60)
        assert result.copied == 2
        assert syncer.stats.batches == 3     # h, then x, then h again (a worker)
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().hget("h", "f0") == b"new"


def test_a_key_a_worker_is_copying_is_not_claimed_by_the_bulk_copy(source, target):
    c = source.client()
    c.hset("h", mapping={f"f{i}": "old" for i in range(20_000)})
    c.set("free", "1")

    async def scenario() -> None:
        syncer = await idle_syncer(source, target, workers=1)
        syncer.start()
        syncer.mark(0, [b"h"])       # a live write's mark: the worker copies h
        await until("the worker's copy of h in flight", lambda: syncer.copying((0, b"h")))
        c.hset("h", "f0", "new")
        result = await asyncio.wait_for(syncer.copy_now(0, [b"h", b"free"]), 60)
        assert result.copied == 2
        assert syncer.stats.batches == 3     # the worker's h, the bulk batch's free, h once more
        assert syncer.empty()
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().hget("h", "f0") == b"new"
    assert target.client().get("free") == b"1"


def test_keys_marked_in_two_bulk_batches_in_flight_are_each_copied_again(source, target):
    """Marks of keys held by two concurrent bulk batches: each batch, as it ends, hands its own marked
    keys (and only those) to the workers."""
    c = source.client()
    small, large = [b"h1"], [b"h2", *(f"s{i}".encode() for i in range(100))]
    for key in (b"h1", b"h2"):
        c.hset(key, mapping={f"f{i}": "old" for i in range(20_000)})
    for key in large[1:]:
        c.set(key, "old")

    async def scenario() -> None:
        syncer = await idle_syncer(source, target)
        copies = [asyncio.create_task(syncer.copy_now(0, keys)) for keys in (small, large)]
        await until("both bulk batches in flight",
                    lambda: syncer.copying((0, b"h1")) and syncer.copying((0, b"h2")))
        for key in large[1:]:
            c.set(key, "new")
        c.hset("h1", "f0", "new")
        c.hset("h2", "f0", "new")
        syncer.mark(0, [*small, *large])
        await asyncio.wait_for(asyncio.gather(*copies), 60)
        assert all(syncer.pending((0, k)) and not syncer.copying((0, k)) for k in small + large)
        assert syncer.backlog == len(small) + len(large)    # dirty, nothing left in _again
        syncer.start()
        assert await syncer.drain(60)
        await close(syncer)

    asyncio.run(scenario())
    t = target.client()
    assert t.hget("h1", "f0") == b"new" and t.hget("h2", "f0") == b"new"
    assert t.mget(large[1:]) == [b"new"] * 100


@pytest.mark.parametrize("mark", [b"h", MemberMark.of(b"h", b"f0")], ids=["whole", "member"])
def test_a_key_marked_during_its_bulk_copy_is_not_copied_by_a_worker_at_the_same_time(source, target, mark):
    """With the workers running: the mark of a key a bulk batch copies (of the key, or of a member of
    it) must wait for that copy to end, never start a second copy of the key beside it (the
    later-starting copy could land first, and the stale one last)."""
    c = source.client()
    c.hset("h", mapping={f"f{i}": "old" for i in range(20_000)})

    async def scenario() -> None:
        syncer = await idle_syncer(source, target)
        pool = syncer.pool
        moving: list[bytes] = []
        overlaps: list[bytes] = []

        def watched(real):  # type: ignore[no-untyped-def]
            async def copy(db, keys, *args):  # type: ignore[no-untyped-def]
                overlaps.extend(k for k in keys if k in moving)
                moving.extend(keys)
                try:
                    return await real(db, keys, *args)
                finally:
                    for k in keys:
                        moving.remove(k)
            return copy

        pool.move, pool.move_members = watched(pool.move), watched(pool.move_members)  # type: ignore[method-assign]
        syncer.start()
        copy = asyncio.create_task(syncer.copy_now(0, [b"h"]))
        await until("the bulk copy of h in flight", lambda: b"h" in moving)
        c.hset("h", "f0", "new")
        syncer.mark(0, [mark])
        await asyncio.wait_for(copy, 60)
        assert await syncer.drain(60)
        assert overlaps == [], "a worker copied h while the bulk copy did"
        assert syncer.stats.batches == 2
        await close(syncer)

    asyncio.run(scenario())
    assert target.client().hget("h", "f0") == b"new"
