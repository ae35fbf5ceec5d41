"""Member-level marks: which writes name the members they change, and how the proxy marks them.

A write to a hash, a set or a sorted set usually changes a few named fields/members of a key that may
hold millions. Marking the whole key makes the syncer copy all of it again; marking (key, member)
lets it copy just the member (docs/protocol.md, "Member-level marks"). That is only lossless when the
command's effect is confined to the members its arguments name, so the commands that take the member
path are listed here, one by one, with how their members are found — everything else (a new command
of a future server version included) is marked as a whole key, as before. tests/proxy/test_member_marks.py
holds this table to each server's COMMAND DOCS: a member command whose arguments changed, or a write
command of these groups that is in neither list, fails the test.

A member mark travels through the proxy where a key mark does, as a ``MemberMark``: a bytes object
equal to its key (so the key-scoped hold, the freeze's in-flight checks and routing see the key it
writes) that also carries the member. The MARK frame carries it as a two-element array [key, member]
(marks.encode_marks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Args = Sequence[bytes]


class MemberMark(bytes):
    """A mark of one member of a key: equal to (and hashed as) the key; ``member`` names the member.

    Not compiled (mypyc cannot subclass bytes); made only for the commands of MEMBER_PATH."""

    member: bytes

    @classmethod
    def of(cls, key: bytes, member: bytes) -> MemberMark:
        mark = cls(key)
        mark.member = member
        return mark

    def __reduce__(self) -> tuple[object, tuple[bytes, bytes]]:   # copy/pickle keep the member
        return MemberMark.of, (bytes(self), self.member)


MemberFn = Callable[[Args], list[bytes]]


def _listed(start: int, step: int) -> MemberFn:
    """Members at args[start::step] (SADD key m..., HSET key f v f v..., HINCRBY key f n)."""
    def marks(args: Args) -> list[bytes]:
        key = args[1]
        return [MemberMark.of(key, m) for m in args[start::step]] if len(args) > start else [key]
    return marks


def _one(index: int) -> MemberFn:
    """One member at a fixed position (ZINCRBY key n member, HSETNX key f v)."""
    def marks(args: Args) -> list[bytes]:
        return [MemberMark.of(args[1], args[index])] if len(args) > index else [args[1]]
    return marks


def _after_fields(pairs: bool) -> MemberFn:
    """``... FIELDS numfields field [value] ...`` (HSETEX, HGETEX, HEXPIRE…, HPERSIST, HGETDEL): the
    options before FIELDS are tokens, some followed by one number (EX 10). Anything that does not parse
    exactly (the server will refuse it, or a future argument) marks the whole key."""
    with_number = {b"EX", b"PX", b"EXAT", b"PXAT"}

    def marks(args: Args) -> list[bytes]:
        key = args[1]
        i, n = 2, len(args)
        while i < n and args[i].upper() != b"FIELDS":
            i += 2 if args[i].upper() in with_number else 1
        if i + 1 >= n:
            return [key]
        try:
            count = int(args[i + 1])
        except ValueError:
            return [key]
        first, width = i + 2, 2 if pairs else 1
        if count <= 0 or n - first != count * width:
            return [key]
        return [MemberMark.of(key, m) for m in args[first::width]]
    return marks


def _expire_fields(args: Args) -> list[bytes]:
    """HEXPIRE key time [NX|XX|GT|LT] FIELDS ...: the time comes first (it may read "FIELDS")."""
    if len(args) < 3:
        return [args[1]]
    return _FIELDS_ONLY([args[0], args[1], *args[3:]])


def _zadd(args: Args) -> list[bytes]:
    """ZADD key [NX|XX] [GT|LT] [CH] [INCR] score member [score member ...]."""
    key, i, n = args[1], 2, len(args)
    while i < n and args[i].upper() in (b"NX", b"XX", b"GT", b"LT", b"CH", b"INCR"):
        i += 1
    if i >= n or (n - i) % 2:
        return [key]
    return [MemberMark.of(key, m) for m in args[i + 1::2]]


def _smove(args: Args) -> list[bytes]:
    """SMOVE source destination member: the member of both keys."""
    if len(args) != 4:
        return list(args[1:3])
    return [MemberMark.of(args[1], args[3]), MemberMark.of(args[2], args[3])]


_FIELDS_ONLY = _after_fields(False)

# Write commands whose every effect is on the members their arguments name (and on the key's
# existence: the last member removed deletes the key, the first one added creates it — the syncer
# sees both). Key positions: as in their key specs, which commandtable checks before using these.
MEMBER_PATH: dict[bytes, MemberFn] = {
    b"hset": _listed(2, 2), b"hmset": _listed(2, 2), b"hsetnx": _one(2), b"hdel": _listed(2, 1),
    b"hincrby": _one(2), b"hincrbyfloat": _one(2),
    b"hsetex": _after_fields(True), b"hgetex": _FIELDS_ONLY, b"hgetdel": _FIELDS_ONLY,
    b"hpersist": _FIELDS_ONLY,
    b"hexpire": _expire_fields, b"hpexpire": _expire_fields, b"hexpireat": _expire_fields,
    b"hpexpireat": _expire_fields,
    b"sadd": _listed(2, 1), b"srem": _listed(2, 1), b"smove": _smove,
    b"zadd": _zadd, b"zincrby": _one(3), b"zrem": _listed(2, 1),
}
# The key positions each member command's key specs must have (begin_search index, one key each):
# a server whose key specs differ gets the whole-key path for that command.
MEMBER_KEY_INDEXES: dict[bytes, tuple[int, ...]] = {name: (1,) for name in MEMBER_PATH}
MEMBER_KEY_INDEXES[b"smove"] = (1, 2)

# Write commands of the hash, set and sorted-set groups that take the whole-key path, and why: their
# effect is on members they do not name (a range, a pop, a random pick), or on other keys (STORE).
WHOLE_KEY: dict[bytes, str] = {
    b"spop": "random members", b"sdiffstore": "replaces the destination",
    b"sinterstore": "replaces the destination", b"sunionstore": "replaces the destination",
    b"zpopmin": "pops by rank", b"zpopmax": "pops by rank", b"bzpopmin": "pops by rank",
    b"bzpopmax": "pops by rank", b"zmpop": "pops by rank", b"bzmpop": "pops by rank",
    b"zremrangebyrank": "a range", b"zremrangebyscore": "a range", b"zremrangebylex": "a range",
    b"zdiffstore": "replaces the destination", b"zinterstore": "replaces the destination",
    b"zunionstore": "replaces the destination", b"zrangestore": "replaces the destination",
}
