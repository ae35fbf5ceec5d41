"""Compare two keyspaces key by key, in both directions.

For each source key: does it exist on the target, with the same type, the same value and the same
absolute expiry (within a tolerance)? Values are compared through a canonical per-type digest, not
DUMP bytes: two equal hashes can have different encodings (listpack vs hashtable) and different
field orders. Keys too big to fetch at once are compared chunk by chunk. Then every target key is
checked to exist on the source ("extra" keys).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from .copier import Unit, refresh_db_keys, unit_sizes
from .errors import ServerError
from .keymover import DEFAULT_BIG_KEY_BYTES, DEFAULT_CHUNK_ELEMENTS
from .progress import NoProgress, Progress
from .resp import Connection, ReplyError, reply_map
from .side import Side
from .topology import Topology

KINDS = ("missing", "extra", "type", "value", "ttl", "field_ttl")   # field_ttl: a hash field's own expiry
MAX_EXAMPLES = 5
FETCH: dict[str, Callable[[bytes], list[tuple[Any, ...]]]] = {
    "string": lambda k: [("GET", k)],
    "hash": lambda k: [("HGETALL", k)],
    "set": lambda k: [("SMEMBERS", k)],
    "zset": lambda k: [("ZRANGE", k, 0, -1, "WITHSCORES")],
    "list": lambda k: [("LRANGE", k, 0, -1)],
    "stream": lambda k: [("XRANGE", k, "-", "+"), ("XINFO", "STREAM", k), ("XINFO", "GROUPS", k)],
}


@dataclasses.dataclass
class Difference:
    kind: str
    db: int
    key: bytes
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "db": self.db, "key": self.key.decode("utf-8", "backslashreplace"),
                "detail": self.detail}


@dataclasses.dataclass
class VerifyReport:
    checked: int = 0
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    examples: list[Difference] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    sampled: bool = False

    @property
    def equal(self) -> bool:
        return not any(self.counts.values())

    def add(self, diff: Difference) -> None:
        self.counts[diff.kind] += 1
        if sum(1 for e in self.examples if e.kind == diff.kind) < MAX_EXAMPLES:
            self.examples.append(diff)

    def as_dict(self) -> dict[str, Any]:
        return {"event": "verify", "equal": self.equal, "checked": self.checked, "sampled": self.sampled,
                "differences": self.counts, "examples": [e.as_dict() for e in self.examples],
                "seconds": round(self.seconds, 3)}


def canonical_digest(ktype: str, replies: Sequence[Any]) -> bytes:
    """A digest equal for equal values whatever their encoding."""
    h = hashlib.blake2b(digest_size=16)

    def put(x: Any) -> None:
        b = x if isinstance(x, bytes) else str(x).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    h.update(ktype.encode())
    value = replies[0]
    if ktype == "string":
        put(value)
    elif ktype == "hash":
        pairs = value.items() if isinstance(value, dict) else zip(value[::2], value[1::2])
        for f, v in sorted(pairs):
            put(f)
            put(v)
    elif ktype == "set":
        for m in sorted(value):
            put(m)
    elif ktype == "list":
        for x in value:
            put(x)
    elif ktype == "zset":  # defined order; scores normalised (servers format doubles differently)
        flat = _flatten(value)
        for member, score in zip(flat[::2], flat[1::2]):
            put(member)
            put(repr(float(score)))
    elif ktype == "stream":
        for entry_id, fields in value:
            put(entry_id)
            for x in fields:
                put(x)
        info = reply_map(replies[1])
        put(info.get(b"last-generated-id", b""))
        for group in replies[2]:
            g = reply_map(group)
            put(g.get(b"name", b""))
            put(g.get(b"last-delivered-id", b""))
            put(g.get(b"pending", 0))
    else:
        raise ServerError(f"cannot compare values of type {ktype!r}")
    return h.digest()


def _flatten(value: Any) -> list[Any]:
    out: list[Any] = []
    for x in value:
        if isinstance(x, list):
            out.extend(x)
        else:
            out.append(x)
    return out



class Verifier:
    def __init__(self, source: Topology, target: Topology, *, tolerance_ms: int = 1000,
                 sample: int | None = None, on_diff: Callable[[str, int, bytes], None] | None = None,
                 progress: Progress | None = None, scan_count: int = 500,
                 big_key_bytes: int = DEFAULT_BIG_KEY_BYTES, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        self.source = source
        self.target = target
        self.tolerance_ms = tolerance_ms
        self.sample = sample
        self.on_diff = on_diff
        self.progress = progress or NoProgress()
        self.scan_count = scan_count
        self.big_key_bytes = big_key_bytes
        self.chunk = chunk_elements
        self.report = VerifyReport(sampled=sample is not None)

    def _diff(self, kind: str, db: int, key: bytes, detail: str) -> None:
        self.report.add(Difference(kind, db, key, detail))
        if self.on_diff:
            self.on_diff(kind, db, key)

    async def run(self) -> VerifyReport:
        t0 = time.monotonic()
        await refresh_db_keys(self.source)
        await refresh_db_keys(self.target)
        src_units = await unit_sizes(self.source)
        dst_units = await unit_sizes(self.target)
        self.progress.start(sum(src_units.values()) + sum(dst_units.values()))
        src, dst = Side(self.source, "durablecache-verify"), Side(self.target, "durablecache-verify")
        try:
            for unit in src_units:
                async for keys in self._keys(self.source, unit):
                    await self._compare(src, dst, unit.db, keys)
            for unit in dst_units:
                async for keys in self._keys(self.target, unit):
                    await self._extras(src, unit.db, keys)
        finally:
            await src.close()
            await dst.close()
            self.progress.finish()
        self.report.seconds = time.monotonic() - t0
        return self.report

    async def _keys(self, topo: Topology, unit: Unit) -> Any:
        conn = await Connection.open(topo.primaries[unit.primary], name="durablecache-verify", select_db=unit.db)
        try:
            if self.sample is not None:
                per_unit = max(1, self.sample // max(1, len(topo.primaries) if topo.cluster else len(topo.db_keys)))
                keys = await conn.pipeline([("RANDOMKEY",)] * per_unit)
                yield sorted({k for k in keys if isinstance(k, bytes)})
                return
            cursor = 0
            for _ in range(1 << 40):
                cursor_raw, keys = await conn.call("SCAN", cursor, "COUNT", self.scan_count)
                cursor = int(cursor_raw)
                if keys:
                    yield list(keys)
                if cursor == 0:
                    return
        finally:
            await conn.close()

    def _expiry_cmd(self, topo: Topology) -> str:
        return "PEXPIRETIME" if topo.supports_pexpiretime else "PTTL"

    async def _meta(self, side: Side, db: int, keys: list[bytes], with_size: bool) -> list[tuple[str, int, int]]:
        cmd = self._expiry_cmd(side.topology)
        now = int(time.time() * 1000)

        def build(k: bytes) -> list[Any]:
            cmds: list[Any] = [("TYPE", k), (cmd, k)]
            if with_size:
                cmds.append(("MEMORY", "USAGE", k))
            return cmds

        out = []
        for r in await side.per_key(db, keys, build, 3 if with_size else 2):
            ktype = r[0].decode() if isinstance(r[0], bytes) else str(r[0])
            exp = int(r[1]) if not isinstance(r[1], ReplyError) else -2
            if cmd == "PTTL" and exp >= 0:
                exp += now
            size = int(r[2]) if with_size and isinstance(r[2], int) else 0
            out.append((ktype, exp, size))
        return out

    async def _compare(self, src: Side, dst: Side, db: int, keys: list[bytes]) -> None:
        smeta, dmeta = await asyncio.gather(self._meta(src, db, keys, True), self._meta(dst, db, keys, False))
        now = int(time.time() * 1000)
        small: dict[str, list[bytes]] = {}
        for key, (stype, sexp, size), (dtype, dexp, _) in zip(keys, smeta, dmeta):
            if stype == "none":
                continue  # deleted or expired since SCAN: nothing to compare
            self.report.checked += 1
            if _expiring(sexp, now, self.tolerance_ms) and (dtype == "none" or abs(sexp - dexp) <= self.tolerance_ms):
                continue  # about to expire on the source, and gone or expiring alike on the target
            if dtype == "none":
                self._diff("missing", db, key, f"{stype} missing on target")
            elif stype != dtype:
                self._diff("type", db, key, f"source {stype}, target {dtype}")
            elif (sexp < 0) != (dexp < 0) or abs(sexp - dexp) > self.tolerance_ms:
                self._diff("ttl", db, key, f"expiry source {sexp} ms, target {dexp} ms (unix ms; -1 none)")
            elif size > self.big_key_bytes:
                kind = await self._big_difference(src, dst, db, key, stype)
                if kind:
                    self._diff(kind, db, key, f"{stype} {'field expiries' if kind == 'field_ttl' else 'values'} differ")
            else:
                small.setdefault(stype, []).append(key)
        for ktype, group in small.items():
            fetch = FETCH.get(ktype)
            if fetch is None:
                raise ServerError(f"key {group[0][:60]!r} has type {ktype!r}, which verify cannot compare")
            n = len(fetch(b""))
            svals, dvals = await asyncio.gather(src.per_key(db, group, fetch, n), dst.per_key(db, group, fetch, n))
            same: list[tuple[bytes, list[bytes]]] = []
            for key, sv, dv in zip(group, svals, dvals):
                if any(isinstance(x, ReplyError) for x in sv + dv) or sv[0] is None or dv[0] is None:
                    continue  # changed type or vanished between the two reads
                if canonical_digest(ktype, sv) != canonical_digest(ktype, dv):
                    self._diff("value", db, key, f"{ktype} values differ")
                elif ktype == "hash":
                    same.append((key, _hash_fields(sv[0])))
            if same and src.topology.field_ttl:
                await self._compare_field_expiries(src, dst, db, same)
        self.progress.advance(len(keys), 0)

    async def _field_expiries(self, side: Side, db: int, fields: dict[bytes, list[bytes]]) -> dict[bytes, list[int]]:
        """Each hash field's own absolute expiry in unix ms (-1: none); all -1 where the server has none."""
        keys = [k for k, fs in fields.items() if fs]
        replies = await side.per_key(db, keys, lambda k: [("HPEXPIRETIME", k, "FIELDS", len(fields[k]), *fields[k])], 1)
        return {k: [int(x) for x in r[0]] if isinstance(r[0], list) else [-1] * len(fields[k])
                for k, r in zip(keys, replies)}

    def _expiries_differ(self, a: list[int], b: list[int], now: int) -> bool:
        for sa, sb in zip(a, b):
            if sa == sb or (_expiring(sa, now, self.tolerance_ms) and (sb < 0 or abs(sa - sb) <= self.tolerance_ms)):
                continue
            if (sa < 0) != (sb < 0) or abs(sa - sb) > self.tolerance_ms:
                return True
        return False

    async def _both_field_expiries(self, src: Side, dst: Side, db: int,
                                   fields: dict[bytes, list[bytes]]) -> tuple[dict[bytes, list[int]], ...]:
        return tuple(await asyncio.gather(self._field_expiries(src, db, fields), self._field_expiries(dst, db, fields)))

    async def _compare_field_expiries(self, src: Side, dst: Side, db: int,
                                      same: list[tuple[bytes, list[bytes]]]) -> None:
        sexp, dexp = await self._both_field_expiries(src, dst, db, dict(same))
        now = int(time.time() * 1000)
        for key, a in sexp.items():
            b = dexp.get(key, [-1] * len(a))
            if self._expiries_differ(a, b, now):
                self._diff("field_ttl", db, key, "hash field expiries differ (source vs target, unix ms)")

    async def _extras(self, src: Side, db: int, keys: list[bytes]) -> None:
        exists = await src.per_key(db, keys, lambda k: [("EXISTS", k)], 1)
        for key, (present,) in zip(keys, exists):
            if present == 0:
                self._diff("extra", db, key, "on target only")
        self.progress.advance(len(keys), 0)

    async def _big_difference(self, src: Side, dst: Side, db: int, key: bytes, ktype: str) -> str | None:
        """Compare a large value chunk by chunk, never holding all of it: None when equal, else the kind
        of difference (value, or field_ttl for a hash whose fields' own expiries differ)."""
        if not await self._big_equal(src, dst, db, key, ktype):
            return "value"
        if ktype != "hash" or not src.topology.field_ttl:
            return None
        cursor: Any = 0
        now = int(time.time() * 1000)
        for _ in range(1 << 40):
            cursor, items = (await src.on_key(db, key, ("HSCAN", key, cursor, "COUNT", self.chunk)))[0]
            names = items[::2]
            if names:
                a, b = await self._both_field_expiries(src, dst, db, {key: list(names)})
                if self._expiries_differ(a[key], b[key], now):
                    return "field_ttl"
            if int(cursor) == 0:
                return None
        return None

    async def _big_equal(self, src: Side, dst: Side, db: int, key: bytes, ktype: str) -> bool:
        """Compare a large value chunk by chunk, never holding all of it."""
        size_cmd = {"string": "STRLEN", "hash": "HLEN", "set": "SCARD", "zset": "ZCARD", "list": "LLEN",
                    "stream": "XLEN"}[ktype]
        (slen,), (dlen,) = await src.on_key(db, key, (size_cmd, key)), await dst.on_key(db, key, (size_cmd, key))
        if slen != dlen:
            return False
        if ktype in ("string", "list", "stream"):
            return await self._ranges_equal(src, dst, db, key, ktype, int(slen))
        scan, probe = {"hash": ("HSCAN", "HMGET"), "set": ("SSCAN", "SMISMEMBER"), "zset": ("ZSCAN", "ZMSCORE")}[ktype]
        cursor: Any = 0
        for _ in range(1 << 40):
            cursor, items = (await src.on_key(db, key, (scan, key, cursor, "COUNT", self.chunk)))[0]
            if items:
                if ktype == "set":
                    (found,) = await dst.on_key(db, key, (probe, key, *items))
                    if not all(found):
                        return False
                else:
                    names, values = items[::2], items[1::2]
                    (found,) = await dst.on_key(db, key, (probe, key, *names))
                    if ktype == "zset":
                        found = [v if isinstance(v, bytes) else repr(v).encode() for v in found]
                        values = [float(v) for v in values]
                        found = [float(v) if v is not None else None for v in found]
                    if list(found) != list(values):
                        return False
            if int(cursor) == 0:
                return True
        return True

    async def _ranges_equal(self, src: Side, dst: Side, db: int, key: bytes, ktype: str, length: int) -> bool:
        step = self.chunk * 100 if ktype == "string" else self.chunk
        start: Any = 0 if ktype != "stream" else "-"
        for _ in range(1 << 40):
            if ktype == "string":
                cmd: tuple[Any, ...] = ("GETRANGE", key, start, start + step - 1)
            elif ktype == "list":
                cmd = ("LRANGE", key, start, start + step - 1)
            else:
                cmd = ("XRANGE", key, start, "+", "COUNT", step)
            (a,), (b,) = await src.on_key(db, key, cmd), await dst.on_key(db, key, cmd)
            if a != b:
                return False
            if not a:
                return True
            if ktype == "stream":
                start = "(" + a[-1][0].decode()
            else:
                start += len(a)
                if start >= length:
                    return True
        return True


def _hash_fields(value: Any) -> list[bytes]:
    """The field names of an HGETALL reply (flat in RESP2, a map in RESP3)."""
    return list(value.keys()) if isinstance(value, dict) else list(value[::2])


def _expiring(expiry: int, now: int, tolerance: int) -> bool:
    return expiry >= 0 and expiry - now <= tolerance
