"""Cluster-wide commands through the proxy: which nodes a command reaches and how their replies merge.

A cluster client sends a keyless command such as ``DBSIZE`` to every primary and merges the replies
as the server's command tips say (``COMMAND INFO``: ``request_policy:all_shards`` /
``all_nodes``, ``response_policy:agg_sum`` / ``all_succeeded`` …). Through the proxy the client sees
one node, so the proxy does what the client would have done: it sends the command to every primary
of the side in authority and merges what comes back. Nothing here is a hand list of commands: the
policies come from the upstream's own tips. The few merges the tips call ``special`` (INFO,
RANDOMKEY, the text reports of MEMORY/LATENCY) are defined here, and so is the SCAN cursor that walks
every shard (scan_cursor / parse_scan_cursor).

The proxy connects to primaries only, so ``all_nodes`` reaches every primary, not the replicas
(docs/limits.md says so).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Final

from .framing import CRLF, frame_end

FAN_REQUESTS: Final = frozenset({"all_shards", "all_nodes"})
# SCAN is "special" in the tips and has its own cursor below; CLUSTERSCAN (Valkey 9) is a cluster
# client's own cursor protocol across real nodes, which the one-node view of the proxy cannot offer.
SHARD_BITS: Final = 10           # shard index bits in a proxy SCAN cursor: up to 1024 shards
SIDE_BIT: Final = 1 << SHARD_BITS


class Policy:
    """How a cluster client would send one command: to every primary, merging with ``response``."""

    __slots__ = ("request", "response")

    def __init__(self, request: str, response: str):
        self.request = request      # "all_shards" | "all_nodes"
        self.response = response    # a response_policy tip, or "" when the tips give none

    def __repr__(self) -> str:
        return f"Policy({self.request!r}, {self.response!r})"


def policy_from_tips(tips: Sequence[Any]) -> Policy | None:
    """The fan-out policy of a command from its COMMAND INFO tips; None for a one-node command."""
    request = response = ""
    for tip in tips:
        t = tip.decode() if isinstance(tip, bytes) else str(tip)
        kind, _, value = t.partition(":")
        if kind == "request_policy":
            request = value
        elif kind == "response_policy":
            response = value
    return Policy(request, response) if request in FAN_REQUESTS else None


# ---- reply frames ------------------------------------------------------------------------------
def is_error(frame: bytes) -> bool:
    return frame[:1] in (b"-", b"!")


def is_null(frame: bytes) -> bool:
    return frame in (b"$-1\r\n", b"*-1\r\n", b"_\r\n")


def _header(frame: bytes) -> tuple[bytes, int, int]:
    """(type byte, count, offset of the first element) of an aggregate frame."""
    nl = frame.index(CRLF)
    return frame[:1], int(frame[1:nl]), nl + 2


def elements(frame: bytes) -> list[bytes]:
    """The element frames of an array / set reply."""
    _t, count, pos = _header(frame)
    out: list[bytes] = []
    for _ in range(max(count, 0)):
        end = frame_end(frame, pos)
        if end < 0:
            raise ValueError("truncated reply")
        out.append(frame[pos:end])
        pos = end
    return out


def _integer(frame: bytes) -> int:
    if frame[:1] != b":":
        raise ValueError(f"not an integer reply: {frame[:40]!r}")
    return int(frame[1:-2])


def text_of(frame: bytes) -> bytes:
    """The payload of a bulk (``$``) or verbatim (``=``, its ``txt:`` prefix dropped) string."""
    nl = frame.index(CRLF)
    body = frame[nl + 2:-2]
    return body[4:] if frame[:1] == b"=" else body


def text_like(template: bytes, body: bytes) -> bytes:
    """``body`` as a frame of the same string type as ``template`` (bulk, or RESP3 verbatim)."""
    if template[:1] == b"=":
        return b"=%d\r\ntxt:%s\r\n" % (len(body) + 4, body)
    return b"$%d\r\n%s\r\n" % (len(body), body)


# ---- merging -----------------------------------------------------------------------------------
def merge(name: bytes, policy: Policy, replies: Sequence[bytes], labels: Sequence[bytes]) -> bytes:
    """One client reply from every primary's reply (``labels``: each primary's address, for text
    reports). The first error wins unless the policy is one_succeeded, as for a cluster client."""
    response = policy.response
    if response == "one_succeeded":
        return next((r for r in replies if not is_error(r)), replies[0])
    errors = [r for r in replies if is_error(r)]
    if errors:
        return errors[0]
    if response == "all_succeeded":
        return replies[0]
    if response in ("agg_sum", "agg_min", "agg_max"):
        if replies[0][:1] == b":":
            return _aggregate(response, [_integer(r) for r in replies])
        return _elementwise(response, replies)
    if response in ("agg_logical_and", "agg_logical_or"):
        return _elementwise(response, replies)
    if response == "special":
        return _special(name, replies, labels)
    return concatenate(replies)


def _aggregate(response: str, values: list[int]) -> bytes:
    if response == "agg_sum":
        return b":%d\r\n" % sum(values)
    return b":%d\r\n" % (min(values) if response == "agg_min" else max(values))


def _elementwise(response: str, replies: Sequence[bytes]) -> bytes:
    """Array replies combined element by element (SCRIPT EXISTS: a script exists if on every shard)."""
    columns = [[_integer(e) for e in elements(r)] for r in replies]
    if len({len(c) for c in columns}) != 1:
        return replies[0]
    out = []
    for values in zip(*columns, strict=True):
        if response == "agg_logical_and":
            out.append(int(all(values)))
        elif response == "agg_logical_or":
            out.append(int(any(values)))
        else:
            out.append(int(_aggregate(response, list(values))[1:-2]))
    t, _count, _pos = _header(replies[0])
    return t + b"%d\r\n" % len(out) + b"".join(b":%d\r\n" % v for v in out)


def concatenate(replies: Sequence[bytes]) -> bytes:
    """Array replies joined (KEYS, SLOWLOG GET); a non-array reply: the first primary's."""
    first = replies[0]
    if first[:1] not in (b"*", b"~") or any(r[:1] != first[:1] for r in replies):
        return first
    parts: list[bytes] = []
    total = 0
    for r in replies:
        _t, count, pos = _header(r)
        total += max(count, 0)
        parts.append(r[pos:])
    return first[:1] + b"%d\r\n" % total + b"".join(parts)


def _special(name: bytes, replies: Sequence[bytes], labels: Sequence[bytes]) -> bytes:
    if name == b"info":
        return text_like(replies[0], merge_info([text_of(r) for r in replies]))
    if name == b"randomkey":
        found = [r for r in replies if not is_null(r)]
        return random.choice(found) if found else replies[0]
    if all(r[:1] in (b"$", b"=") for r in replies):   # text reports: one section per primary
        body = b"".join(b"# %s\n%s\n" % (label, text_of(r)) for label, r in zip(labels, replies, strict=True))
        return text_like(replies[0], body)
    return replies[0]


def merge_info(texts: Sequence[bytes]) -> bytes:
    """INFO from every primary: the first primary's text, with the keyspace section summed over all.

    ``db0:keys=…,expires=…,avg_ttl=…`` lines add keys and expires; avg_ttl is weighted by expires.
    Other sections (memory, clients, stats) stay the first primary's: per-node figures that a sum would
    misstate (``used_memory_peak``, ratios) are not made up here.
    """
    dbs: dict[bytes, dict[bytes, int]] = {}
    for t in texts:
        for db, fields in _keyspace(t):
            acc = dbs.setdefault(db, {b"keys": 0, b"expires": 0, b"ttl_weight": 0})
            acc[b"keys"] += fields.get(b"keys", 0)
            acc[b"expires"] += fields.get(b"expires", 0)
            acc[b"ttl_weight"] += fields.get(b"avg_ttl", 0) * fields.get(b"expires", 0)
    lines = texts[0].split(b"\r\n")
    out: list[bytes] = []
    in_keyspace = False
    for line in lines:
        if line.startswith(b"# "):
            if in_keyspace:
                out.extend(_keyspace_lines(dbs))
            in_keyspace = line.strip() == b"# Keyspace"
            out.append(line)
            continue
        if in_keyspace and line.startswith(b"db"):
            continue
        if in_keyspace and not line:
            out.extend(_keyspace_lines(dbs))
            in_keyspace = False
            dbs = {}
        out.append(line)
    if in_keyspace:
        out.extend(_keyspace_lines(dbs))
    return b"\r\n".join(out)


def _keyspace(text: bytes) -> list[tuple[bytes, dict[bytes, int]]]:
    found = []
    for line in text.split(b"\r\n"):
        if line.startswith(b"db") and b":" in line:
            db, _, rest = line.partition(b":")
            fields = {}
            for pair in rest.split(b","):
                k, _, v = pair.partition(b"=")
                if v.isdigit():
                    fields[k] = int(v)
            found.append((db, fields))
    return found


def _keyspace_lines(dbs: dict[bytes, dict[bytes, int]]) -> list[bytes]:
    out = []
    for db in sorted(dbs, key=lambda d: int(d[2:]) if d[2:].isdigit() else 0):
        acc = dbs[db]
        if not acc[b"keys"]:
            continue
        avg = acc[b"ttl_weight"] // acc[b"expires"] if acc[b"expires"] else 0
        out.append(b"%s:keys=%d,expires=%d,avg_ttl=%d" % (db, acc[b"keys"], acc[b"expires"], avg))
    return out


# SLOWLOG GET n / COMMANDLOG GET n type: n entries per node, concatenated: the client asked for n.
_LOGS = {b"slowlog": 2, b"commandlog": 2}


def entry_limit(args: Sequence[bytes]) -> int:
    """How many entries a log query asked for (SLOWLOG GET 1); -1 when it did not say."""
    at = _LOGS.get(args[0].lower())
    if at is None or len(args) <= at or args[1].lower() != b"get":
        return -1
    try:
        return int(args[at])
    except ValueError:
        return -1


def first_entries(frame: bytes, limit: int) -> bytes:
    if limit < 0 or frame[:1] not in (b"*", b"~"):
        return frame
    items = elements(frame)
    if len(items) <= limit:
        return frame
    return frame[:1] + b"%d\r\n" % limit + b"".join(items[:limit])


# ---- SCAN across shards ------------------------------------------------------------------------
def scan_cursor(shard: int, cursor: int, side: int) -> int:
    """The cursor the client sees: the shard's own cursor, the shard's index and the side it walks.

    ``side`` (0 or 1) is the authority's generation: a cursor issued before a FLIP names the old
    side, and the proxy then starts the scan again on the new one (keys may come twice, none that
    existed throughout is missed: SCAN's own guarantee). A cursor is 0 only at the very end.
    """
    return (cursor << (SHARD_BITS + 1)) | (side << SHARD_BITS) | shard


def parse_scan_cursor(value: int) -> tuple[int, int, int]:
    """(shard, shard cursor, side) of a client's cursor."""
    return value & (SIDE_BIT - 1), value >> (SHARD_BITS + 1), (value >> SHARD_BITS) & 1


def next_scan_cursor(shard: int, shards: int, reply_cursor: int, side: int) -> int:
    """The client's next cursor after ``shard`` answered with ``reply_cursor``: 0 after the last shard."""
    if reply_cursor:
        return scan_cursor(shard, reply_cursor, side)
    if shard + 1 < shards:
        return scan_cursor(shard + 1, 0, side)
    return 0


def scan_reply(cursor: int, keys_frame: bytes) -> bytes:
    """SCAN's two-element reply with the proxy's cursor in place of the shard's."""
    text = b"%d" % cursor
    return b"*2\r\n$%d\r\n%s\r\n%s" % (len(text), text, keys_frame)
