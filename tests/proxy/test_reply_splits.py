"""Replies split anywhere: the counted path (runs of scalar-reply commands, Upstream._count) and the
framed path must both forward every reply once, in order, and never a write's reply before its marks.

The proxy talks to a real valkey-server; only the upstream reply stream is then fed by the test, cut
at every byte offset, because no real server can be made to split its replies at a chosen byte. The
client side is a recording transport for the same reason: what matters is when each byte is written.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import libvalkey
import pytest

from durablecache.proxy import Proxy
from durablecache.proxy.framing import count_scalars
from durablecache.proxy.session import Session
from durablecache.proxy.upstream import Upstream
from durablecache.testing.waiting import wait_for_async


class Recorder:
    """A transport that records what is written, and checks the marks came first."""

    def __init__(self, marked: list[bytes], needs: dict[bytes, bytes]):
        self.out = b""
        self.marked = marked
        self.needs = needs   # a reply fragment -> the key that must be marked before it is written

    def write(self, data: bytes) -> None:
        self.out += data
        for fragment, key in self.needs.items():
            if fragment in self.out:
                assert key in self.marked, f"{fragment!r} written before {key!r} was marked"

    def get_extra_info(self, _name: str) -> Any:
        return None

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Sink:
    def write(self, _data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


async def connected_session(proxy: Proxy, client: Any) -> tuple[Session, Upstream]:
    """A session for a recording client transport, once its real upstream connection's own handshake
    (CLIENT SETNAME ...) has completed."""
    session = Session(proxy, 1)
    session.connection_made(client)
    upstream = session.conn(0)
    await wait_for_async("the upstream handshake to complete",
                         lambda: upstream.transport is not None and not session.pending, 1)
    return session, upstream


def cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


# Three client chunks -> three runs: reads, writes, reads. The second scenario puts an MGET (an array
# reply) in the write run, so that run takes the framed path.
SCENARIOS = {
    "scalar runs": (
        [cmd(b"GET", b"a") + cmd(b"GET", b"a2"), cmd(b"SET", b"b", b"1") + cmd(b"INCR", b"c"), cmd(b"GET", b"d")],
        b"$1\r\nA\r\n$-1\r\n+OK\r\n:7\r\n$12\r\nhello\r\nworld\r\n",
        {b"+OK\r\n": b"b", b":7\r\n": b"c"},
    ),
    "an array reply among them": (
        [cmd(b"GET", b"a"), cmd(b"SET", b"b", b"1") + cmd(b"MGET", b"x", b"y") + cmd(b"SET", b"c", b"2"),
         cmd(b"GET", b"d")],
        b"$1\r\nA\r\n+OK\r\n*2\r\n$1\r\nX\r\n$-1\r\n+OK\r\n$2\r\nDD\r\n",
        {b"+OK\r\n": b"c"},
    ),
}


def splits(n: int) -> list[list[int]]:
    """Every single cut, and every pair of cuts 3 bytes apart (a frame split three ways)."""
    return [[i] for i in range(1, n)] + [[i, i + 3] for i in range(1, n - 3)]


@pytest.mark.parametrize("delivery", ["sync", "async"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_split_of_the_reply_stream(source, scenario, delivery):
    requests, replies, needs = SCENARIOS[scenario]
    counted = {True: 0, False: 0}

    async def one(proxy: Proxy, cuts: list[int]) -> tuple[bytes, list[bytes], int]:
        marked: list[bytes] = []
        proxy.on_marks = _recorder(marked, delivery == "sync")
        client = Recorder(marked, needs)
        session, upstream = await connected_session(proxy, client)
        real, upstream.transport = upstream.transport, Sink()  # type: ignore[assignment]
        for chunk in requests:
            session.data_received(chunk)
        chunks, taken = proxy.reply_chunks, proxy.reply_chunks_counted
        for a, b in zip([0, *cuts], [*cuts, len(replies)]):
            upstream.data_received(replies[a:b])
        counted[True] += proxy.reply_chunks_counted - taken
        counted[False] += proxy.reply_chunks - chunks - (proxy.reply_chunks_counted - taken)
        session.transport = None
        real.close()
        return client.out, marked, len(session.pending)

    async def scenario_runs() -> None:
        proxy = Proxy(source.endpoint(), listen_port=0, on_marks=_recorder([], delivery == "sync"))
        await proxy.start()
        try:
            for cuts in splits(len(replies)):
                out, marked, left = await one(proxy, cuts)
                assert out == replies, (cuts, out)
                assert left == 0, cuts
                assert set(needs.values()) <= set(marked), (cuts, marked)
        finally:
            await proxy.stop()

    asyncio.run(scenario_runs())
    assert counted[True] and counted[False], counted  # both paths were taken, in turn


def _recorder(marked: list[bytes], sync: bool) -> Any:
    """An on_marks of either kind (the proxy delivers to them differently: server.py, marks_now and submit_marks)."""
    def on_marks(_db: int, keys: list[bytes]) -> None:
        marked.extend(keys)

    async def on_marks_async(_db: int, keys: list[bytes]) -> None:
        marked.extend(keys)
    return on_marks if sync else on_marks_async


def test_count_scalars_agrees_with_libvalkeys_reader():
    """framing.count_scalars on random scalar replies, cut at every byte: a count only for whole frames,
    the same count as the reader's; -1 for a frame cut short, an aggregate, or more than the limit."""
    rng = random.Random(11)
    frames = [b"+OK\r\n", b"-ERR wrong\r\n", b":0\r\n", b":-42\r\n", b"$-1\r\n", b"$0\r\n\r\n",
              b"$4\r\na\r\nb\r\n", b"$12\r\nhello\r\nworld\r\n", b"$1\r\n$\r\n"]
    for _ in range(200):
        chosen = [rng.choice(frames) for _ in range(rng.randint(1, 6))]
        stream = b"".join(chosen)
        ends = {sum(len(f) for f in chosen[:k]): k for k in range(1, len(chosen) + 1)}
        for cut in range(1, len(stream) + 1):
            got = count_scalars(stream[:cut], len(chosen))
            if cut not in ends:
                assert got == -1, (stream, cut)
                continue
            reader = libvalkey.Reader()
            reader.feed(stream[:cut])
            parsed = 0
            while reader.gets() is not False:
                parsed += 1
            assert got == parsed == ends[cut], (stream, cut)
        assert count_scalars(stream, len(chosen) - 1) == -1       # more replies than expected
    for aggregate in (b"*1\r\n$1\r\na\r\n", b"+OK\r\n*-1\r\n", b">2\r\n", b"_\r\n", b"$01\r\na\r\n"):
        assert count_scalars(aggregate, 10) == -1, aggregate
