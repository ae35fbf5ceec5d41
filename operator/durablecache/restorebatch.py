"""The bulk copy's and the syncer's write batch: fetched keys sorted into RESTORE ... REPLACE ABSTTL
(a DUMP payload) and SET [PXAT] (a string value) per target primary, framed as RESP directly, plus the
keys gone from the source and those too big for one read. keymover.KeyMover fills one per batch of keys
and sends its groups; this module only builds them (no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import libvalkey

# A key whose DUMP payload is at least this large gets its copy time reported (MoveResult.timings):
# the syncer learns from it which keys are too slow to copy inside the cutover's write pause.
TIMED_KEY_BYTES = 256 * 1024

_HEAD = b"*6\r\n$7\r\nRESTORE\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n"
_HEAD_NO_TTL = b"*6\r\n$7\r\nRESTORE\r\n$%d\r\n%b\r\n$1\r\n0\r\n$%d\r\n"
_TAIL = b"\r\n$7\r\nREPLACE\r\n$6\r\nABSTTL\r\n"
_SET = b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n"
_SET_PXAT = b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n"
_PXAT_TAIL = b"\r\n$4\r\nPXAT\r\n$%d\r\n%b\r\n"
_END = b"\r\n"


class WriteGroup:
    """The writes for one target primary, encoded as RESP (about twice as fast as packing a tuple
    per command); three parts per command: head, payload, tail."""

    __slots__ = ("parts", "count", "bytes")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.count = 0
        self.bytes = 0

    def command(self, i: int) -> list[bytes]:
        """The i-th command decoded back into its arguments (only for the rare rejected one)."""
        reader = libvalkey.Reader()
        reader.feed(b"".join(self.parts[3 * i:3 * i + 3]))
        return reader.gets()  # type: ignore[no-any-return]


class RestoreBatch:
    """Sorts fetched keys into writes grouped by target primary (RESTORE ... REPLACE ABSTTL for a
    DUMP payload, SET [PXAT] for a string value), keys gone from the source (or already past their
    expiry) and keys too big for one read. Call add_* for every fetched key, then close().

    This is the bulk copy's hot loop: one pass, no per-key object beyond the RESP pieces.
    """

    def __init__(self, topology: Any, sent_ms: int, relative: bool, limit: int):
        self.groups: dict[int, WriteGroup] = {}
        self.big: list[bytes] = []
        self.gone: list[bytes] = []
        self.unread: list[bytes] = []  # string reads that were not plain values: read them again
        self.expired = 0  # counted among gone
        self.timed: list[tuple[bytes, int]] = []  # (key, payload size) of keys worth timing
        self.count = self.bytes = 0
        self._single = None if topology.cluster else self.groups.setdefault(0, WriteGroup()).parts
        self._primary_for = topology.primary_for
        self._sent_ms, self._relative, self._limit = sent_ms, relative, limit

    def add_dumps(self, keys: Sequence[bytes], expiries: Sequence[int], payloads: Sequence[Any]) -> None:
        """DUMP payloads; None: gone (expiry -2) or too big for one DUMP (expiry -3)."""
        self._add(keys, expiries, payloads, True)

    def add_values(self, keys: Sequence[bytes], expiries: Sequence[Any], values: Sequence[Any]) -> None:
        """GETRANGE 0 <limit> and PEXPIRETIME replies, unchecked."""
        self._add(keys, expiries, values, False)

    def close(self) -> None:
        for primary, group in list(self.groups.items()):
            group.count = len(group.parts) // 3
            group.bytes = sum(map(len, group.parts[1::3]))
            if not group.count:
                del self.groups[primary]
        self.count = sum(g.count for g in self.groups.values())
        self.bytes = sum(g.bytes for g in self.groups.values())

    def _add(self, keys: Sequence[bytes], expiries: Sequence[Any], payloads: Sequence[Any], restore: bool) -> None:
        single, primary_for, groups, big, gone = self._single, self._primary_for, self.groups, self.big, self.gone
        sent_ms, relative, limit = self._sent_ms, self._relative, self._limit
        for key, expiry, payload in zip(keys, expiries, payloads):
            if restore:
                if payload is None:  # -2: gone, -3: too big for one DUMP
                    (big if expiry == -3 else gone).append(key)
                    continue
            elif payload.__class__ is not bytes or not payload or expiry.__class__ is not int:
                self.unread.append(key)  # an error (not a string after all, a moved slot) or b""
                continue
            elif len(payload) > limit:
                (gone if expiry == -2 else big).append(key)
                continue
            if expiry >= 0:
                abs_ms = sent_ms + expiry if relative else expiry
                if abs_ms <= sent_ms:  # already past its expiry: must not exist on the target
                    self.expired += 1
                    gone.append(key)
                    continue
                ttl = b"%d" % abs_ms
            elif expiry == -2:
                gone.append(key)
                continue
            else:
                ttl = None
            if key.__class__ is str:  # callers may pass str keys; RESP wants bytes
                key = key.encode()
            size = len(payload)
            if single is not None:
                parts = single
            else:
                primary = primary_for(key)
                group = groups.get(primary)
                if group is None:
                    group = groups[primary] = WriteGroup()
                parts = group.parts
            if restore:
                if ttl is None:
                    parts += (_HEAD_NO_TTL % (len(key), key, size), payload, _TAIL)
                else:
                    parts += (_HEAD % (len(key), key, len(ttl), ttl, size), payload, _TAIL)
            elif ttl is None:
                parts += (_SET % (len(key), key, size), payload, _END)
            else:
                parts += (_SET_PXAT % (len(key), key, size), payload, _PXAT_TAIL % (len(ttl), ttl))
            if size >= TIMED_KEY_BYTES:
                self.timed.append((key, size))
