"""The proxy's C module (_resp.c) against its references in typed Python: framing.scan_run and
marks.encode_marks. The C functions must accept, reject and produce exactly what the references do,
on random input as on the edge cases; and the proxy must run them when the package was built."""

from __future__ import annotations

import os
import random

import libvalkey
import pytest
from test_reply_splits import cmd  # tests/proxy is on sys.path (pytest's rootdir import)

from durablecache.proxy import marks, session
from durablecache.proxy.framing import command_head, command_tail, scan_run
from durablecache.proxy.marks import encode_marks

if os.environ.get("DURABLECACHE_PURE_PYTHON") == "1":
    pytest.skip("built without C (DURABLECACHE_PURE_PYTHON=1): there is no C module to compare",
                allow_module_level=True)
from durablecache.proxy import _resp  # noqa: E402 — a build without it fails here, as it should


def test_the_proxy_runs_the_c_functions() -> None:
    assert session.scan_run is _resp.scan_run
    assert marks.mark_frame is _resp.mark_frame


def random_pipeline(rng: random.Random) -> bytes:
    """Commands named alike (runs), other names, arguments of RESP-looking bytes; then perhaps cut
    short or with one byte changed, so that the scan also stops where it must."""
    alphabet = b"ab*$\r\n:0123456789-"
    names = [b"SET", b"SET", b"SET", b"set", b"GET", b"SETX", b"SE"]
    commands = []
    for _ in range(rng.randint(1, 8)):
        args = [rng.choice(names)] + [bytes(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 3, 12])))
                                      for _ in range(rng.randint(0, 4))]
        commands.append(cmd(*args))
    data = b"".join(commands)
    if rng.random() < 0.3:
        data = data[:rng.randrange(1, len(data) + 1)]
    if rng.random() < 0.3:
        i = rng.randrange(len(data))
        data = data[:i] + bytes([rng.choice(alphabet)]) + data[i + 1:]
    return data


def test_scan_run_in_c_matches_the_reference() -> None:
    rng = random.Random(11)
    compared = runs = 0
    for _ in range(20000):
        data = random_pipeline(rng)
        argc, name_start, name_end = command_head(data, 0)
        if argc < 0:
            continue
        end = command_tail(data, name_end + 2, argc - 1, 0)[0]
        if end < 0:
            continue
        key_at = rng.randint(0, 4)
        keys_c: list[bytes] = []
        keys_py: list[bytes] = []
        got = _resp.scan_run(data, end, name_start, name_end, key_at, keys_c)
        assert got == scan_run(data, end, name_start, name_end, key_at, keys_py), data
        assert keys_c == keys_py, data
        compared += 1
        runs += got[1] >= 2
    assert compared > 5000 and runs > 500, (compared, runs)   # the random input did exercise runs


def test_scan_run_counts_what_libvalkey_parses() -> None:
    """A run the scan accepts is what libvalkey's reader reads from the same bytes."""
    data = b"".join(cmd(b"SET", b"k%d" % i, b"v" * i) for i in range(50)) + b"*3\r\n$3\r\nSET\r\n$2\r\nk"
    argc, name_start, name_end = command_head(data, 0)
    end = command_tail(data, name_end + 2, argc - 1, 0)[0]
    keys: list[bytes] = []
    pos, count = _resp.scan_run(data, end, name_start, name_end, 1, keys)
    reader = libvalkey.Reader()
    reader.feed(data[end:pos])
    parsed = []
    while (command := reader.gets()) is not False:
        parsed.append(command)
    assert count == len(parsed) == 49 and not reader.has_data()
    assert keys == [c[1] for c in parsed] == [b"k%d" % i for i in range(1, 50)]


@pytest.mark.parametrize("frame", [
    b"*3\r\n$03\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",          # a leading zero
    b"*3\r\n$3\r\nSET\r\n$-1\r\n$1\r\nv\r\n",                 # a sign
    b"*3\r\n$3\r\nSET\r\n:1\r\n$1\r\nv\r\n",                  # an argument that is not a bulk string
    b"*3\r\n$3\r\nSET\r\n$1000000000\r\nk\r\n$1\r\nv\r\n",   # ten digits: more than a scan takes
    b"*3\r\n$3\r\nSET\r\n$999999999\r\nk\r\n$1\r\nv\r\n",    # nine digits, not that many bytes
    b"*0\r\n",
    b"*3\r\n$3\r\nSET\r\n$1\r\nkX\r\n$1\r\nv\r\n",           # payload longer than declared
])
def test_scan_run_stops_where_the_reference_does(frame: bytes) -> None:
    good = cmd(b"SET", b"a", b"1")
    data = good * 3 + frame + good
    keys_c: list[bytes] = []
    keys_py: list[bytes] = []
    _, name_start, name_end = command_head(data, 0)
    got = _resp.scan_run(data, len(good), name_start, name_end, 1, keys_c)      # after the first SET
    assert got == scan_run(data, len(good), name_start, name_end, 1, keys_py) == (3 * len(good), 2)
    assert keys_c == keys_py == [b"a", b"a"]


@pytest.mark.parametrize("call", [
    lambda: _resp.scan_run("SET", 0, 0, 0, 0, []),                   # not bytes
    lambda: _resp.scan_run(b"*1\r\n", 0, 0, 0, 0, ()),               # not a list
    lambda: _resp.scan_run(b"*1\r\n", 9, 0, 0, 0, []),               # past the end
    lambda: _resp.scan_run(b"*1\r\n", 0, 3, 2, 0, []),               # name ends before it starts
    lambda: _resp.scan_run(b"*1\r\n", -1, 0, 0, 0, []),
    lambda: _resp.scan_run(b"*1\r\n", 0, 0, 0, 0),                   # too few arguments
    lambda: _resp.scan_run(b"*1\r\n", 0, 0, 9, 0, []),               # name past the end
    lambda: _resp.scan_run(b"*1\r\n", 0, 0, 0, -1, []),              # negative key index
    lambda: _resp.scan_run(b"*1\r\n", 2**70, 0, 0, 0, []),           # an offset no machine has
    lambda: _resp.mark_frame(0, [b"a", "b"]),                        # a key that is not bytes
    lambda: _resp.mark_frame("0", [b"a"]),
    lambda: _resp.mark_frame(0, (b"a",)),
])
def test_bad_arguments_raise_instead_of_reading_out_of_bounds(call) -> None:
    with pytest.raises((TypeError, ValueError, OverflowError)):
        call()


def test_mark_frame_in_c_matches_the_reference_and_libvalkey() -> None:
    rng = random.Random(5)
    lengths = [0, 1, 9, 10, 11, 99, 100, 101, 255, 256, 999, 1000, 65536, 100001]
    keys = [bytes(rng.randrange(256) for _ in range(n)) for n in lengths]
    keys += [b"key:%012d" % i for i in range(1000)]
    for db in (0, 7, 15, 10**12, -1):
        for some in ([], keys[:1], keys):
            frame = _resp.mark_frame(db, some)
            assert frame == encode_marks(db, some)
            assert frame == libvalkey.pack_command((b"MARK", db, *some))
