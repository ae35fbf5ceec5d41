"""How marks reach ``on_marks``: a synchronous callback (the in-process syncer), a coroutine function,
or a MarkServer over TCP (RemoteMarks: streamed, FREEZE waits for the acks), and what a client sees
when delivery fails."""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import libvalkey
import pytest
import valkey

from durablecache.errors import ConnectError
from durablecache.proxy import MarkServer, RemoteMarks
from durablecache.proxy.marks import FLUSH_DELAY, mark_frame
from durablecache.testing.waiting import wait_for, wait_for_async

pytestmark = pytest.mark.timeout(60)


def sync_recorder(marked: list[bytes]) -> Any:
    def on_marks(_db: int, keys: list[bytes]) -> None:
        marked.extend(keys)
    return on_marks


def async_recorder(marked: list[bytes]) -> Any:
    async def on_marks(_db: int, keys: list[bytes]) -> None:
        await asyncio.sleep(0)          # suspends: the delivery finishes in a task
        marked.extend(keys)
    return on_marks


@pytest.mark.parametrize("recorder", [sync_recorder, async_recorder], ids=["sync", "async"])
def test_every_acknowledged_write_was_marked_first(source, make_proxy, recorder):
    marked: list[bytes] = []
    p = make_proxy(source.endpoint(), on_marks=recorder(marked))
    c = valkey.Valkey(port=p.port, socket_timeout=5)
    for i in range(50):
        assert c.set(f"k{i}", i)
        assert f"k{i}".encode() in marked, i        # marked before the OK reached us
    pipe = c.pipeline(transaction=False)
    for i in range(200):
        pipe.incr(f"n{i % 7}")
    pipe.execute()
    assert {f"n{i}".encode() for i in range(7)} <= set(marked)
    assert p.proxy.delivery.marks_failed == 0
    c.close()


def failing_sync(_db: int, _keys: list[bytes]) -> None:
    raise RuntimeError("syncer gone")


async def failing_async(_db: int, _keys: list[bytes]) -> None:
    raise RuntimeError("syncer gone")


def returns_a_coroutine(_db: int, _keys: list[bytes]) -> Any:
    """A plain function that returns an awaitable (a lambda around an async callback, say): the proxy
    took it for synchronous, so it must refuse it rather than acknowledge unmarked writes."""
    async def later() -> None:
        pass
    return later()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the refused coroutine is never awaited
@pytest.mark.parametrize("on_marks", [failing_sync, failing_async, returns_a_coroutine],
                         ids=["sync raises", "async raises", "sync returns an awaitable"])
def test_a_write_whose_marks_fail_is_never_acknowledged(source, make_proxy, on_marks):
    p = make_proxy(source.endpoint(), on_marks=on_marks)
    c = valkey.Valkey(port=p.port, socket_timeout=5, retry_on_timeout=False)
    assert c.get("x") is None                      # reads need no marks
    with pytest.raises(valkey.ConnectionError):
        c.set("x", 1)                              # written upstream, but not acknowledged
    assert p.proxy.delivery.marks_failed == 1
    assert source.client().get("x") == b"1"        # ... which is why the session had to end


def remote_proxy(make_proxy: Any, source: Any, on_marks: Any, *, retry_for: float = 0.5) -> tuple[Any, Any, Any]:
    """A proxy whose marks go over TCP to a MarkServer (both on the proxy's loop)."""
    p = make_proxy(source.endpoint())
    server = MarkServer(on_marks, "tok")
    p.run(server.start())
    remote = RemoteMarks("127.0.0.1", server.port, "tok", retry_for=retry_for)
    p.run(remote.connect())
    p.call(lambda: setattr(p.proxy, "on_marks", remote))
    return p, server, remote


def test_remote_marks_are_streamed_and_freeze_waits_for_the_syncers_ack(source, make_proxy):
    """Writes are answered without waiting for the syncer (their marks follow within FLUSH_DELAY), and
    FREEZE is the barrier: it returns only once the syncer acknowledged every mark."""
    got: list[bytes] = []
    syncer_busy = asyncio.Event()
    syncer_busy.set()

    async def on_marks(_db: int, keys: list[bytes]) -> None:
        await syncer_busy.wait()
        got.extend(keys)
    p, server, remote = remote_proxy(make_proxy, source, on_marks)
    c = valkey.Valkey(port=p.port, socket_timeout=5, retry_on_timeout=False)
    assert c.set("warm", 1)
    p.run(p.proxy.freeze(5.0))
    p.call(p.proxy.unfreeze)
    assert b"warm" in got

    p.call(lambda: setattr(remote, "stale_after", 60.0))   # a silent syncer here is the point, not a fault
    p.call(syncer_busy.clear)                     # the syncer takes marks but does not ack them
    for i in range(20):
        assert c.set(f"r{i}", i)                  # answered all the same
    pipe = c.pipeline(transaction=False)
    for i in range(300):
        pipe.hset(f"h{i % 11}", "f", i)
    pipe.execute()
    assert p.call(lambda: remote.pending) > 0
    with pytest.raises(TimeoutError):
        p.run(p.proxy.freeze(0.3))                # marks unacknowledged: no cutover may start
    assert not {f"r{i}".encode() for i in range(20)} <= set(got)
    p.call(p.proxy.unfreeze)

    p.call(syncer_busy.set)
    p.run(p.proxy.freeze(5.0))
    assert {f"r{i}".encode() for i in range(20)} | {f"h{i}".encode() for i in range(11)} <= set(got)
    assert p.call(lambda: p.proxy.stats()["marks_unacknowledged_bytes"]) == 0
    assert p.proxy.delivery.marks_failed == 0
    p.call(p.proxy.unfreeze)
    c.close()
    p.run(remote.close())
    p.run(server.stop())


def test_a_silent_syncer_stops_the_streaming(source, make_proxy):
    """Fail closed across hosts (docs/ha.md): once a frame has waited for its ack longer than
    stale_after, a write is applied upstream but not answered until its marks are acknowledged."""
    got: list[bytes] = []
    syncer_busy = asyncio.Event()
    syncer_busy.set()

    async def on_marks(_db: int, keys: list[bytes]) -> None:
        await syncer_busy.wait()
        got.extend(keys)
    p, server, remote = remote_proxy(make_proxy, source, on_marks)
    p.call(lambda: setattr(remote, "stale_after", 0.2))
    c = valkey.Valkey(port=p.port, socket_timeout=10, retry_on_timeout=False)
    p.call(syncer_busy.clear)                      # the syncer goes silent
    assert c.set("streamed", 1)                    # answered at once: nothing waits yet
    wait_for("the silent syncer to count as stale", lambda: not p.call(lambda: remote.streaming(time.monotonic())), 10)
    direct = source.client()
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(c.set, "waits", 1)
        wait_for("the write applied upstream", lambda: direct.get("waits") is not None, 10)   # applied upstream...
        assert not reply.done()                         # ... but not answered
        p.call(syncer_busy.set)
        assert reply.result(10) is True                 # answered once the syncer acknowledged
    assert b"waits" in got and b"streamed" in got
    c.close()
    p.run(remote.close())
    p.run(server.stop())


def test_past_the_stream_limit_writes_wait_for_the_syncers_ack(source, make_proxy):
    """With its backlog full (here: a limit of 0 bytes), the proxy answers a write only once the syncer
    acknowledged its marks, and never once the syncer is gone."""
    got: list[bytes] = []
    p, server, remote = remote_proxy(make_proxy, source, lambda _db, keys: got.extend(keys))
    p.call(lambda: setattr(p.proxy.delivery, "mark_stream_bytes", 0))
    c = valkey.Valkey(port=p.port, socket_timeout=5, retry_on_timeout=False)
    for i in range(20):
        assert c.set(f"r{i}", i)
        assert f"r{i}".encode() in got, i            # the syncer had it before we got the OK
    assert p.proxy.delivery.marks_throttled >= 20

    p.run(server.stop())                            # the syncer goes away
    wait_for("the proxy to see its stream end", lambda: p.call(lambda: p.proxy.delivery.down), 10)
    # Fail closed (docs/ha.md): refused before it is sent, so nothing is written without its marks.
    with pytest.raises(valkey.ResponseError, match="TRYAGAIN .*lost its coordinator"):
        c.set("after", 1)
    assert source.client().get("after") is None
    assert b"after" not in got
    assert p.call(lambda: p.proxy.stats()["writes_refused"]) == 1
    p.run(remote.close())


def test_streamed_marks_outlive_a_syncer_outage():
    """Marks of writes already answered are never dropped: a failed reconnect fails only the batches
    someone waits for, and the streamed ones are re-sent once the syncer is back."""
    async def main() -> None:
        second: list[bytes] = []
        lost: list[str] = []
        server = MarkServer(lambda _db, _keys: None, "tok", on_lost=lost.append)
        await server.start()
        port = server.port
        remote = RemoteMarks("127.0.0.1", port, "tok", retry_for=0.2)
        await remote.connect()
        await server.stop()
        await wait_for_async("the proxy side to see its stream end", lambda: not remote.connected, 5)

        tasks_before = len(asyncio.all_tasks())
        for _ in range(30):                      # streamed: their writes were answered
            remote.submit({0: [b"answered"]})
            await asyncio.sleep(FLUSH_DELAY + 0.002)   # each framed on its own
        assert len(asyncio.all_tasks()) <= tasks_before + 1   # one reconnect under way, not one per frame
        outcome: list[BaseException | None] = []
        remote.submit({0: [b"waiting"]}, outcome.append)
        await wait_for_async("the waited-for batch to fail", lambda: outcome, 5)
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectError)
        assert remote.pending == 30              # the streamed frames are kept, the failed one dropped

        restarted = MarkServer(lambda _db, keys: second.extend(keys), "tok", port=port)
        await restarted.start()
        await wait_for_async("the kept frames re-sent (retried every RETRY_PAUSE)", lambda: not remote.pending, 5)
        assert second == [b"answered"] * 30
        assert remote.backlog_bytes == 0
        assert len(lost) == 1
        await remote.close()
        await restarted.stop()
    asyncio.run(main())


def test_remote_marks_reconnect_and_resend_what_was_not_acknowledged():
    """The syncer's mark server restarts: marks submitted meanwhile are sent once it is back (within
    retry_for) and acknowledged then; the old server reported the dropped stream as a possible loss."""
    async def main() -> None:
        first: list[bytes] = []
        second: list[bytes] = []
        lost: list[str] = []
        server = MarkServer(lambda _db, keys: first.extend(keys), "tok", on_lost=lost.append)
        await server.start()
        port = server.port
        remote = RemoteMarks("127.0.0.1", port, "tok", retry_for=5.0)
        await remote(0, [b"before"])
        assert first == [b"before"]

        await server.stop()
        # A compiled coroutine cancelled through a finally block must not leave its CancelledError
        # behind as the thread's handled exception (see MarkServer._serve).
        assert sys.exc_info() == (None, None, None)
        await wait_for_async("the proxy side to see its stream end", lambda: not remote.connected, 5)
        outcome: list[BaseException | None] = []
        remote.submit({0: [b"during"], 2: [b"other-db"]}, outcome.append)
        await asyncio.sleep(0.3)                 # reconnect attempts fail: nothing listens
        assert outcome == []
        restarted = MarkServer(lambda db, keys: second.extend((db, k) for k in keys), "tok", port=port)
        await restarted.start()
        await wait_for_async("the resent batch acknowledged", lambda: outcome, 5)
        assert outcome == [None]
        assert second == [(0, b"during"), (2, b"other-db")]
        assert len(lost) == 1                    # the first server saw the stream end without BYE
        await remote.close()
        await restarted.stop()
    asyncio.run(main())


def test_mark_frames_are_the_resp_libvalkey_would_send():
    for keys in ([b"k", b"", b"\r\n$3\r\n", bytes(range(256)), b"x" * 70000], [b"one"], []):
        for db in (0, 7, 15):
            assert mark_frame(db, keys) == libvalkey.pack_command((b"MARK", db, *keys))
