"""Reply bookkeeping: the entry each expected reply has in a session's queue (``Entry``), the queue
(``Replies``), and small readers of reply frames."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final

import libvalkey

COMPACT_AT: Final = 1024              # Replies: taken slots that may stay in its list
Marks = list[tuple[int | None, list[bytes]]]


class Entry:
    """One expected reply. ``reply`` is set when complete; ``fn`` computes a local reply instead."""

    __slots__ = ("reply", "marks", "cb", "fn", "args", "conn", "blocking", "remaining", "parts",
                 "redirects", "internal", "count", "writes", "scalar")

    def __init__(self, marks: Marks | None = None, cb: Callable[[Entry], None] | None = None):
        self.reply: bytes | None = None
        self.marks = marks
        self.cb = cb
        self.fn: Callable[[], bytes] | None = None
        self.args: tuple[bytes, ...] | None = None   # kept for MOVED/ASK retries (cluster)
        # The upstream connection (upstream.Upstream) it was sent on, None for the proxy's own
        # answers; only compared by identity, so typed ``object`` here, below the module that defines it.
        self.conn: object | None = None
        self.blocking = False
        self.remaining = 0        # pub/sub confirmations still expected
        self.parts: list[bytes] | None = None
        self.redirects = 0
        self.internal = False     # the proxy's own command: the reply never reaches the client
        self.count = 0            # a run (fast path): replies still expected for its commands
        self.writes = 1           # writes whose marks these are (a run: how many of its commands)
        self.scalar = False       # a run whose every reply is one frame of SCALAR_REPLY


READ: Final = Entry()   # a plain reply (standalone): forwarded as it is, nothing to do when it arrives


class Replies:
    """The entries whose replies are expected, oldest first: a list and the index of its head.
    (collections.deque is no native type for mypyc: every operation on it would be a generic method
    call, several per chunk on the hot path.) A taken entry's slot holds READ until the list empties,
    or until such slots are the larger part of at least COMPACT_AT."""

    __slots__ = ("items", "head")

    def __init__(self) -> None:
        self.items: list[Entry] = []
        self.head = 0

    def __len__(self) -> int:
        return len(self.items) - self.head

    def __bool__(self) -> bool:
        return len(self.items) > self.head

    def __getitem__(self, i: int) -> Entry:
        return self.items[self.head + i]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.items[self.head:])

    def append(self, e: Entry) -> None:
        self.items.append(e)

    def popleft(self) -> Entry:
        items = self.items
        head = self.head
        e = items[head]
        items[head] = READ        # what a taken entry holds (replies, commands, keys) is freed now
        head += 1
        if head == len(items):
            items.clear()
            head = 0
        elif head >= COMPACT_AT and 2 * head >= len(items):
            del items[:head]
            head = 0
        self.head = head
        return e

    def clear(self) -> None:
        self.items.clear()
        self.head = 0


def first_word(frame: bytes) -> bytes:
    """The first element of an array/push frame whose first element is a bulk string, lowercased."""
    nl = frame.find(b"\r\n")
    if nl < 0 or len(frame) <= nl + 1 or frame[nl + 2] != 0x24:   # '$'
        return b""
    nl2 = frame.find(b"\r\n", nl + 2)
    size = int(frame[nl + 3:nl2])
    return frame[nl2 + 2:nl2 + 2 + size].lower()


def last_int(frame: bytes) -> int:
    """The trailing integer of a pub/sub confirmation ``[kind, channel, :count]``."""
    i = frame.rfind(b":", 0, len(frame) - 2)
    try:
        return int(frame[i + 1:-2])
    except ValueError:
        return 0


def hello_id(frame: bytes) -> int | None:
    """The connection id in a HELLO reply (RESP2: a flat array, RESP3: a map)."""
    try:
        reply = parse_frame(frame)
    except libvalkey.ProtocolError:
        return None
    if isinstance(reply, list):
        reply = dict(zip(reply[::2], reply[1::2]))
    if isinstance(reply, dict):
        value = reply.get(b"id")
        if isinstance(value, int):
            return value
    return None


def parse_frame(frame: bytes) -> Any:
    r = libvalkey.Reader()
    r.feed(frame)
    return r.gets()

