"""Requests split anywhere: the fast path scans plain commands in place (framing.command_head/tail) and
hands the rest of a chunk to libvalkey's reader. Whatever the cuts, the upstream must receive exactly the
client's bytes, every command must expect one reply, and every write's key must be marked.

The proxy's upstream connection is real (a valkey-server, for its handshake); what it is sent is then
recorded by the test, because the point is the exact bytes forwarded for each way of cutting them.
"""

from __future__ import annotations

import asyncio
import random

import libvalkey
import pytest
from test_reply_splits import Recorder, cmd, connected_session  # tests/proxy is on sys.path (pytest's rootdir import)

from durablecache.proxy import Proxy
from durablecache.proxy.framing import command_head, command_tail, name_sig


class Capture:
    """The upstream transport: records what the proxy forwards."""

    def __init__(self) -> None:
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


# Reads, fixed-key writes (scanned), a multi-key write and a subcommand (the reader's path), a blocking
# write (an entry of its own), a value holding RESP-looking bytes, and an empty value.
PIPELINE = [
    (b"GET", b"a"), (b"SET", b"b", b"1"), (b"get", b"a"), (b"MSET", b"c", b"1", b"d", b"2"),
    (b"INCR", b"e"), (b"OBJECT", b"ENCODING", b"a"), (b"HSET", b"h", b"f", b"*2\r\n$3\r\nDEL\r\n"),
    (b"BLMOVE", b"src", b"dst", b"LEFT", b"RIGHT", b"0"), (b"SET", b"empty", b""), (b"GET", b"b"),
]
# The keys a proxy must mark, in request order, and how many writes there are.
WRITTEN = [b"b", b"c", b"d", b"e", b"h", b"src", b"dst", b"empty"]
WRITES = 6
# Runs of one name (the second command on is scanned by scan_run, in C when built): keys of several
# lengths, an argument more, a value that looks like a command, a name in another case, a key marked
# twice, and writes without their key (counted, nothing to mark).
RUNS = [
    (b"SET", b"k1", b"v"), (b"SET", b"key2", b"vv"), (b"SET", b"k3", b"v", b"EX", b"100"),
    (b"SET", b"k4", b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$1\r\ny\r\n"), (b"GET", b"a"), (b"GET", b"bb"),
    (b"GET", b"c"), (b"set", b"k5", b"v"), (b"set", b"k6", b"v"), (b"set", b"k7", b""), (b"INCR", b"n"),
    (b"INCR", b"n"), (b"INCR", b"m"), (b"SET",), (b"SET",), (b"SET",),
]
RUNS_WRITTEN = [b"k1", b"key2", b"k3", b"k4", b"k5", b"k6", b"k7", b"n", b"n", b"m"]
RUNS_WRITES = 13


def cuts_of(n: int) -> list[list[int]]:
    """Every single cut, and every pair of cuts 5 bytes apart."""
    return [[i] for i in range(1, n)] + [[i, i + 5] for i in range(1, n - 5)]


@pytest.mark.parametrize(("pipeline", "written", "writes"),
                         [(PIPELINE, WRITTEN, WRITES), (RUNS, RUNS_WRITTEN, RUNS_WRITES)], ids=["mixed", "runs"])
def test_every_split_of_a_pipeline_is_forwarded_unchanged(source, pipeline, written, writes):
    payload = b"".join(cmd(*c) for c in pipeline)

    async def one(proxy: Proxy, cuts: list[int]) -> tuple[bytes, int, list[bytes], int, int]:
        session, upstream = await connected_session(proxy, Recorder([], {}))
        real, upstream.transport = upstream.transport, Capture()  # type: ignore[assignment]
        for a, b in zip([0, *cuts], [*cuts, len(payload)]):
            session.data_received(payload[a:b])
        expected = sum(e.count or 1 for e in session.pending)
        keys = [k for e in session.pending for _, ks in e.marks or () for k in ks]
        marked_writes = sum(e.writes for e in session.pending if e.marks is not None)
        sent = upstream.transport.sent  # type: ignore[attr-defined]
        session.transport = None
        real.close()
        return sent, expected, keys, marked_writes, session.inflight

    async def scenario() -> None:
        proxy = Proxy(source.endpoint(), listen_port=0, on_marks=lambda _db, _keys: None)
        await proxy.start()
        try:
            for cuts in [[], *cuts_of(len(payload))]:
                sent, expected, keys, marked_writes, inflight = await one(proxy, cuts)
                assert sent == payload, cuts
                assert expected == len(pipeline), cuts
                assert keys == written, cuts
                assert marked_writes == inflight == writes, cuts     # what FREEZE waits for
        finally:
            await proxy.stop()

    asyncio.run(scenario())


def test_scanned_commands_match_libvalkeys_reader():
    """command_head/command_tail against the reader on random plain commands and every prefix of
    them: whatever the scan accepts is a complete command the reader parses the same way."""
    rng = random.Random(7)
    alphabet = b"ab*$\r\n:0123456789-"
    for _ in range(300):
        args = [bytes(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 2, 5, 12])))
                for _ in range(rng.randint(1, 5))]
        args[0] = args[0] or b"x"
        frame = cmd(*args)
        key_at = rng.randint(0, len(args))
        for cut in range(1, len(frame) + 1):
            buf = frame[:cut] + b"*"             # a byte of the next command follows
            argc, name_start, name_end = command_head(buf, 0)
            end = -1
            if argc >= 0:
                assert buf[name_start:name_end] == args[0]
                end, key_start, key_end = command_tail(buf, name_end + 2, argc - 1, key_at)
            if cut < len(frame):
                assert end == -1, (frame, cut)   # never accepts a command it does not have whole
                continue
            assert (argc, end) == (len(args), len(frame)), frame
            reader = libvalkey.Reader()
            reader.feed(frame)
            assert reader.gets() == args
            if 1 <= key_at < len(args):
                assert buf[key_start:key_end] == args[key_at]
            else:
                assert (key_start, key_end) == (-1, -1)


@pytest.mark.parametrize("frame", [
    b"*1\r\n$03\r\nGET\r\n",          # leading zero
    b"*01\r\n$3\r\nGET\r\n",
    b"*-1\r\n",                       # sign
    b"*0\r\n",                        # empty array
    b"*2\r\n$3\r\nGET\r\n:1\r\n",     # an argument that is not a bulk string
    b"*2\r\n$3\r\nGET\r\n$-1\r\n",    # a null argument
    b"*1\r\n$3\r\nGETX\r\n",          # payload longer than declared
    b"*1\r\n$3\r\nGET\n\n",           # no CRLF after the payload
    b"*1\r\n$\r\nGET\r\n",            # no length
    b"*1\r$3\r\nGET\r\n",             # CR without LF
    b"*1\r\n$9999999999\r\nGET\r\n",  # absurd length
    b"GET a\r\n",                     # inline
])
def test_anything_not_plainly_canonical_is_left_to_the_reader(frame: bytes) -> None:
    argc, _, name_end = command_head(frame, 0)
    if argc >= 0:
        assert command_tail(frame, name_end + 2, argc - 1, 1)[0] == -1, frame
    else:
        assert argc == -1



def test_name_sig_tells_every_short_name_apart():
    """The scan reuses the previous command's class when the next name has the same sig: two different
    names with one sig would be classified alike (a write taken for a read would go unmarked)."""
    names = {b"", b"a", b"A", b"\x00", b"\x00\x00", b"get", b"GET", b"set", b"SET", b"getex", b"\x00get",
             b"getdel\x00", b"1234567", b"\xff" * 7}
    rng = random.Random(7)
    names |= {bytes(rng.randrange(256) for _ in range(rng.randrange(8))) for _ in range(5000)}
    sigs = {name_sig(n, 0, len(n)) for n in names}
    assert len(sigs) == len(names) and min(sigs) >= 0
    assert name_sig(b"*SETx", 1, 4) == name_sig(b"SET", 0, 3)     # only the slice counts
    assert name_sig(b"xxEXPIREAT", 2, 10) == -1                    # longer names: looked up by bytes
