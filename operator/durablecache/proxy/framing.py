"""RESP framing for the proxy: where a reply ends, and how to encode the replies the proxy makes itself.

Replies are not parsed into Python objects on the hot path: the proxy only needs to know where each
top-level frame ends and whether it is a RESP3 push (``>``), which libvalkey's reader does not tell.
``frame_end`` walks one frame with ``bytes.find`` and is cheap for the common one-line and bulk replies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from mypy_extensions import i64

CRLF: Final = b"\r\n"
_BULK: Final = frozenset(b"$!=")          # length-prefixed payloads
_AGG1: Final = frozenset(b"*~>")          # aggregates of N frames
_AGG2: Final = frozenset(b"%|")           # aggregates of N pairs
PUSH: Final = 0x3E                        # '>'
MINUS: Final = 0x2D                       # '-'


def frame_end(buf: bytes, pos: int) -> int:
    """End offset of the complete frame starting at ``pos``; or, when incomplete, a negative number:
    ``-1`` (need more, amount unknown) or ``-n`` (the buffer must hold at least ``n`` bytes)."""
    n = len(buf)
    remaining = 1
    while remaining:
        if pos >= n:
            return -1
        t = buf[pos]
        nl = buf.find(CRLF, pos + 1)
        if nl < 0:
            return -1
        if t in _BULK:
            size = int(buf[pos + 1:nl])
            pos = nl + 2 if size < 0 else nl + size + 4
            if pos > n:
                return -pos
        elif t in _AGG1:
            count = int(buf[pos + 1:nl])
            pos = nl + 2
            if count > 0:
                remaining += count
        elif t in _AGG2:
            count = int(buf[pos + 1:nl])
            pos = nl + 2
            if count > 0:
                remaining += 2 * count
            if t == 0x7C:  # '|' attribute: the frame it annotates follows
                remaining += 1
        else:
            pos = nl + 2
        remaining -= 1
    return pos


# ---- plain commands, scanned in place ---------------------------------------------------------------
# The proxy's fast path reads most commands without building Python objects for them: only the name
# (to classify it) and a write's key are sliced out. Anything not plainly canonical (an incomplete
# command, a sign, a leading zero, a non-bulk argument) is reported as "not here" (-1) and left to
# libvalkey's reader, which parses it or reports the protocol error.

def _count_at(buf: bytes, i: i64, n: i64) -> tuple[i64, i64]:
    """The canonical decimal at ``i`` ended by CRLF: (value, offset after CRLF), or (-1, 0)."""
    start = i
    value: i64 = 0
    while i < n:
        c = buf[i]
        if c == 13:
            if i == start or i + 1 >= n or buf[i + 1] != 10 or (buf[start] == 48 and i - start > 1):
                return -1, 0
            return value, i + 2
        if c < 48 or c > 57 or i - start >= 9:
            return -1, 0
        value = value * 10 + (c - 48)
        i += 1
    return -1, 0


def _bulk_at(buf: bytes, i: i64, n: i64) -> tuple[i64, i64]:
    """The canonical bulk string whose ``$`` is at ``i``, whole in ``buf``: (start, end) of its
    payload, or (-1, 0)."""
    if i >= n or buf[i] != 0x24:     # '$'
        return -1, 0
    size, start = _count_at(buf, i + 1, n)
    end = start + size
    if size < 0 or end + 2 > n or buf[end] != 13 or buf[end + 1] != 10:
        return -1, 0
    return start, end


def command_head(buf: bytes, pos: i64) -> tuple[i64, i64, i64]:
    """The array of bulk strings starting at ``pos``: (argument count, start, end) of its first
    argument (the command name), the name complete in ``buf``; (-1, 0, 0) otherwise."""
    n: i64 = len(buf)
    if pos >= n or buf[pos] != 0x2A:      # '*'
        return -1, 0, 0
    argc, i = _count_at(buf, pos + 1, n)
    if argc < 1:
        return -1, 0, 0
    start, end = _bulk_at(buf, i, n)
    if start < 0:
        return -1, 0, 0
    return argc, start, end


def command_tail(buf: bytes, pos: i64, args: i64, key_at: i64) -> tuple[i64, i64, i64]:
    """``args`` more bulk strings from ``pos`` (after the name): (end of the command, start, end) of the
    argument at index ``key_at`` (the name is index 0; (-1, -1) for none); (-1, 0, 0) when the command
    is not complete and plain in ``buf``."""
    n: i64 = len(buf)
    key_start: i64 = -1
    key_end: i64 = -1
    i = pos
    for index in range(1, args + 1):
        start, end = _bulk_at(buf, i, n)
        if start < 0:
            return -1, 0, 0
        if index == key_at:
            key_start, key_end = start, end
        i = end + 2
    return i, key_start, key_end


def scan_run(buf: bytes, pos: i64, name_start: i64, name_end: i64, key_at: i64,
             keys: list[bytes]) -> tuple[i64, i64]:
    """From ``pos``, the plain complete commands named ``buf[name_start:name_end]`` (a pipeline's run
    of one command): (where the last ends, how many). The argument at index ``key_at`` (the name is
    0; 0 for none) of each is appended to ``keys``. The reference for _resp.c's, which the proxy
    runs when it was built."""
    name = buf[name_start:name_end]
    count: i64 = 0
    while True:
        argc, start, end = command_head(buf, pos)
        if argc < 0 or end - start != name_end - name_start or buf[start:end] != name:
            return pos, count
        end, key_start, key_end = command_tail(buf, end + 2, argc - 1, key_at)
        if end < 0:
            return pos, count
        if key_start >= 0:
            keys.append(buf[key_start:key_end])
        count += 1
        pos = end


def name_sig(buf: bytes, start: i64, end: i64) -> i64:
    """The bytes ``buf[start:end]`` (a command name of up to 7 bytes) packed into one integer with
    their length, so that a name can be compared with the previous one without slicing it out; -1 for
    longer names."""
    size = end - start
    if size > 7:
        return -1
    sig: i64 = 0
    for i in range(start, end):
        sig = (sig << 8) | buf[i]
    return (sig << 3) | size


def count_scalars(buf: bytes, limit: i64) -> i64:
    """How many RESP2 frames ``buf`` holds if it holds only whole single-line (``+`` ``-`` ``:``) and
    bulk-string frames, at most ``limit`` of them; -1 otherwise (an aggregate, a frame cut short, too
    many): the caller frames such a chunk the general way."""
    n: i64 = len(buf)
    i: i64 = 0
    count: i64 = 0
    while i < n:
        t = buf[i]
        if t == 0x2B or t == 0x2D or t == 0x3A:          # '+' '-' ':'
            i += 1
            while i < n and buf[i] != 13:
                i += 1
            if i + 1 >= n or buf[i + 1] != 10:
                return -1
            i += 2
        elif t == 0x24:                                   # '$'
            if i + 4 < n and buf[i + 1] == 0x2D and buf[i + 2] == 0x31 and buf[i + 3] == 13 and buf[i + 4] == 10:
                i += 5                                    # $-1: a null
            else:
                start, end = _bulk_at(buf, i, n)
                if start < 0:
                    return -1
                i = end + 2
        else:
            return -1
        count += 1
        if count > limit:
            return -1
    return count


def split_inline(line: bytes) -> list[bytes]:
    """An inline command (``PING``, ``SET a "b c"``): words, honouring double and single quotes."""
    out: list[bytes] = []
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] in b" \t":
            i += 1
        if i >= n:
            break
        q = line[i]
        if q in b"\"'":
            j = line.find(bytes([q]), i + 1)
            if j < 0:
                j = n
            out.append(line[i + 1:j])
            i = j + 1
        else:
            j = i
            while j < n and line[j] not in b" \t":
                j += 1
            out.append(line[i:j])
            i = j
    return out


# ---- encoders for the replies the proxy answers itself -------------------------------------------

OK: Final = b"+OK\r\n"
QUEUED: Final = b"+QUEUED\r\n"
NOAUTH: Final = b"-NOAUTH Authentication required.\r\n"


def error(msg: str) -> bytes:
    return b"-" + msg.replace("\r", " ").replace("\n", " ").encode() + CRLF


def bulk(value: bytes | str | None, resp3: bool = False) -> bytes:
    if value is None:
        return b"_\r\n" if resp3 else b"$-1\r\n"
    if isinstance(value, str):
        value = value.encode()
    return b"$%d\r\n%s\r\n" % (len(value), value)


def null_array(resp3: bool) -> bytes:
    return b"_\r\n" if resp3 else b"*-1\r\n"


def encode(value: Any, resp3: bool = False) -> bytes:
    """Python value -> RESP: dict is a map (a flat array in RESP2), str/bytes bulk, int integer."""
    if value is None:
        return bulk(None, resp3)
    if isinstance(value, bool):
        return b":%d\r\n" % int(value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, (bytes, str)):
        return bulk(value)
    if isinstance(value, dict):
        body = b"".join([encode(k, resp3) + encode(v, resp3) for k, v in value.items()])
        return (b"%%%d\r\n" % len(value) if resp3 else b"*%d\r\n" % (2 * len(value))) + body
    if isinstance(value, Sequence):
        return b"*%d\r\n" % len(value) + b"".join([encode(v, resp3) for v in value])
    raise TypeError(f"cannot encode {type(value).__name__}")
