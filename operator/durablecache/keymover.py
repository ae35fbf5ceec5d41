"""Copy the current value of given keys from one side to the other: the unit of work of the bulk copy
and of the syncer.

A key is copied as DUMP + absolute expiry -> RESTORE ... REPLACE ABSTTL, so the time a copy takes
never extends a TTL. A key that no longer exists on the source is deleted on the target (the syncer
needs that; for a bulk copy it is a no-op). Keys larger than ``big_key_bytes`` are copied element by
element in chunks (HSCAN/SSCAN/ZSCAN/LRANGE/XRANGE/GETRANGE) so that neither server blocks on one huge
DUMP or RESTORE and our memory stays bounded. The chunked path is also the fallback when the target
cannot read the source's DUMP format (e.g. a newer Valkey's payload restored into an older Redis).
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import time
from collections.abc import Container, Coroutine, Sequence
from typing import Any, TypeVar

from . import logs
from .errors import ServerError
from .ratelimit import TokenBucket
from .resp import ReplyError, pack, reply_map
from .restorebatch import RestoreBatch, WriteGroup
from .side import Side

MiB = 1 << 20
DEFAULT_BIG_KEY_BYTES = 64 * MiB
DEFAULT_CHUNK_ELEMENTS = 1000
DEFAULT_CHUNK_BYTES = 1 * MiB
# Replies that mean "not now": an async-durable target whose durability lag is over its limit,
# a server still loading, a busy script. Retried with exponential backoff, never dropped.
RETRYABLE_PREFIXES = ("TRYAGAIN", "LOADING", "BUSY", "CLUSTERDOWN", "DURABILITY", "NOREPLICAS")
RETRY_LIMIT_SECONDS = 120.0
log = logs.get("durablecache.copy")
T = TypeVar("T")

# One round trip per source primary per batch instead of three commands per key: the script reads
# each key's size, expiry and DUMP payload. Keys are passed as ARGV (a batch spans many slots of
# one node, which allow-cross-slot-keys permits); a key that is not local fails the whole call and
# that batch falls back to pipelines. -2 = gone, -3 = too big for one DUMP.
FETCH = """#!lua flags=no-writes,allow-cross-slot-keys
local limit = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local k = ARGV[i]
  local size = redis.call('MEMORY', 'USAGE', k)
  if not size then out[#out + 1] = -2; out[#out + 1] = false
  elseif size > limit then out[#out + 1] = -3; out[#out + 1] = false
  else out[#out + 1] = redis.call('PEXPIRETIME', k); out[#out + 1] = redis.call('DUMP', k) end
end
return out"""


# Member-level copies (docs/protocol.md, "Member-level marks"): one script reads the named members'
# current state on the source, atomically with the key's type and expiry; another applies it on the
# target — only when the target's key has the same type and expiry, i.e. only the members can differ.
# Anything else (the key created, deleted and re-created, expired on one side first, a type that has
# no members) returns 0 and the key is to be copied whole (by the syncer: a whole copy never overlaps
# another copy of the key). ARGV[1] = "1" when the source has hash field TTLs.
READ_MEMBERS = """#!lua flags=no-writes
local k = KEYS[1]
local t = redis.call('TYPE', k)['ok']
local out = {t, redis.call('PEXPIRETIME', k)}
if t == 'zset' then
  for i = 2, #ARGV do out[#out + 1] = redis.call('ZSCORE', k, ARGV[i]) end
elseif t == 'set' then
  for i = 2, #ARGV do out[#out + 1] = redis.call('SISMEMBER', k, ARGV[i]) end
elseif t == 'hash' then
  for i = 2, #ARGV do
    out[#out + 1] = redis.call('HGET', k, ARGV[i])
    if ARGV[1] == '1' then
      out[#out + 1] = redis.call('HPEXPIRETIME', k, 'FIELDS', 1, ARGV[i])[1]
    else
      out[#out + 1] = -1
    end
  end
end
return out"""
# ARGV: type, expiry (PEXPIRETIME), "1" when the target has hash field TTLs, then per member — zset: member, score
# ("" = absent); set: member, "1"/"0"; hash: field, "1"/"0", value, its expiry (unix ms, or -1).
# Type "none" (the key is gone on the source): ARGV[4..] are the members, removed from the target's key.
# A member copy writes only its members, never the key as a whole (no DEL): copies of other members of
# the key may be in flight beside it, and the key's existence follows from its members.
APPLY_MEMBERS = """#!lua
local k = KEYS[1]
local t = ARGV[1]
local REMOVE = {zset = 'ZREM', set = 'SREM', hash = 'HDEL'}
if t == 'none' then
  local have = redis.call('TYPE', k)['ok']
  if have == 'none' then return 1 end
  if REMOVE[have] == nil then return 0 end
  for i = 4, #ARGV do redis.call(REMOVE[have], k, ARGV[i]) end
  return 1
end
if redis.call('TYPE', k)['ok'] ~= t or redis.call('PEXPIRETIME', k) ~= tonumber(ARGV[2]) then
  return 0
end
local step = ({zset = 2, set = 2, hash = 4})[t]
if step == nil then return 0 end
-- Additions first, removals last: a removal that emptied the key would delete it, and an addition
-- after it would create a new key, without the expiry checked above.
for i = 4, #ARGV, step do
  local m, v = ARGV[i], ARGV[i + 1]
  if t == 'zset' then
    if v ~= '' then redis.call('ZADD', k, v, m) end
  elseif v == '1' then
    if t == 'set' then redis.call('SADD', k, m) else redis.call('HSET', k, m, ARGV[i + 2]) end
  end
end
if t == 'hash' then
  for i = 4, #ARGV, 4 do
    if ARGV[i + 1] == '1' then
      if tonumber(ARGV[i + 3]) > 0 then
        redis.call('HPEXPIREAT', k, ARGV[i + 3], 'FIELDS', 1, ARGV[i])
      elseif ARGV[3] == '1' then
        redis.call('HPERSIST', k, 'FIELDS', 1, ARGV[i])
      end
    end
  end
end
for i = 4, #ARGV, step do
  local v = ARGV[i + 1]
  if v == '' or (v == '0' and t ~= 'zset') then redis.call(REMOVE[t], k, ARGV[i]) end
end
return 1"""
MEMBER_TYPES = (b"zset", b"set", b"hash")


def _read_string_template(limit: int) -> bytes:
    """GETRANGE key 0 <limit>, PEXPIRETIME key, as RESP to be completed with (len, key, len, key).

    Keys the caller knows to be strings (the bulk copy's SCAN ... TYPE string) are read as plain
    values: GETRANGE up to the big-key limit is the size probe and the read in one, so a string costs
    the source two cheap commands instead of MEMORY USAGE + PEXPIRETIME + DUMP (which compresses and
    checksums), and the target a SET ... PXAT instead of a RESTORE. Value first, expiry second: a key
    deleted in between reads as gone. The hint may be stale, and GETRANGE cannot tell the empty
    string from a missing key: a key with any other reply takes the pipelined DUMP path.
    """
    return (b"*4\r\n$8\r\nGETRANGE\r\n$%d\r\n%b\r\n$1\r\n0\r\n" + b"$%d\r\n%d\r\n" % (len(b"%d" % limit), limit)
            + b"*2\r\n$11\r\nPEXPIRETIME\r\n$%d\r\n%b\r\n")


@dataclasses.dataclass
class MoveResult:
    copied: int = 0
    deleted: int = 0  # gone on the source: removed on the target
    expired: int = 0  # expired between SCAN and DUMP, or already past its expiry
    big: int = 0
    bytes: int = 0
    members: int = 0  # members copied one by one (move_members)
    # Keys move_members could not patch member by member: the caller copies them whole (Syncer: once no
    # other copy of the key is in flight).
    unpatched: list[builtins.bytes] = dataclasses.field(default_factory=list)
    # (key, seconds) for big keys only: chunked copies measured, a big DUMP/RESTORE estimated as its
    # share (by payload bytes) of the whole batch's time. Few entries per batch by construction.
    timings: list[tuple[builtins.bytes, float]] = dataclasses.field(default_factory=list)  # not the field above

    def add(self, other: MoveResult) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def skipped(self) -> int:
        return self.deleted + self.expired


@dataclasses.dataclass
class MoverOptions:
    big_key_bytes: int = DEFAULT_BIG_KEY_BYTES
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


class KeyMover:
    def __init__(self, src: Side, dst: Side, opts: MoverOptions,
                 source_ops: TokenBucket | None = None, target_bytes: dict[int, TokenBucket] | None = None):
        self.src = src
        self.dst = dst
        self.opts = opts
        self.source_ops = source_ops or TokenBucket(None)
        self.target_bytes = target_bytes if target_bytes is not None else {}
        self.expire_cmd = "PEXPIRETIME" if src.topology.supports_pexpiretime else "PTTL"
        # Scripts need Valkey / Redis >= 7 on both sides (shebang flags, PEXPIRETIME).
        self.use_scripts = src.topology.supports_pexpiretime and dst.topology.supports_pexpiretime
        self.member_copies = True      # False once a member script was refused (see _no_member_copies)
        self._read_string = _read_string_template(opts.big_key_bytes)

    async def move(self, db: int, keys: Sequence[bytes], strings: Container[bytes] = frozenset()) -> MoveResult:
        """Copy keys; ``strings`` are those believed to be strings (a hint, see _read_string_template)."""
        result = MoveResult()
        if not keys:
            return result
        await self.source_ops.take(len(keys) * 3)
        started = time.monotonic()
        batch = RestoreBatch(self.dst.topology, int(time.time() * 1000), relative=self.expire_cmd != "PEXPIRETIME",
                              limit=self.opts.big_key_bytes)
        await self._fetch(db, keys, strings, batch)
        big, gone = batch.big, batch.gone
        result.expired += batch.expired
        if batch.count:
            await self._throttle_target(batch)
            fallback = await self._restore_all(db, batch)
            result.copied += batch.count - len(fallback)
            result.bytes += batch.bytes
            self._estimate_timings(batch, time.monotonic() - started, result)
            for key in fallback:
                await self.copy_chunked(db, key, result)
        if gone:
            await self._delete(db, gone)
            result.deleted += len(gone) - result.expired
        for key in big:
            await self.copy_chunked(db, key, result)
        return result

    async def move_members(self, db: int, parts: dict[bytes, list[bytes]]) -> MoveResult:
        """Copy just the named members of each key (its current state on the source: value, score,
        field TTL, or absence). Keys where that cannot be done exactly (see APPLY_MEMBERS; servers
        without scripts and PEXPIRETIME always) are not copied here but listed in ``unpatched``: the
        caller copies them whole once no other copy of them is in flight."""
        if not (self.use_scripts and self.member_copies):
            return MoveResult(unpatched=list(parts))
        keys = list(parts)
        await self.source_ops.take(sum(len(m) for m in parts.values()) + len(keys))
        ttls = b"1" if self.src.topology.field_ttl else b"0"
        reads = await self.src.per_key(db, keys, lambda k: [("EVAL", READ_MEMBERS, 1, k, ttls, *parts[k])], 1)
        ttls = b"1" if self.dst.topology.field_ttl else b"0"
        applies: dict[bytes, list[Any]] = {}
        unpatched: list[bytes] = []
        for key, (state,) in zip(keys, reads):
            if isinstance(state, ReplyError):
                if str(state).startswith(RETRYABLE_PREFIXES):
                    raise ServerError(f"source: reading members failed: {state}")   # the batch is retried
                self._no_member_copies("source", state)
                return MoveResult(unpatched=keys)
            argv = _apply_args(state, ttls, parts[key])
            if argv is None:
                unpatched.append(key)
            else:
                applies[key] = ["EVAL", APPLY_MEMBERS, 1, key, *argv]
        result = MoveResult()
        if applies:
            refused = await self._apply_members(db, applies)
            result.members += sum(len(parts[k]) for k in applies if k not in refused)
            unpatched += refused
        result.unpatched = unpatched
        return result

    async def _apply_members(self, db: int, applies: dict[bytes, list[Any]]) -> list[bytes]:
        """Run the APPLY_MEMBERS calls; transient rejections are retried (as _write_retrying).
        Returns the keys the target refused to patch (they are copied whole)."""
        delay, deadline = 0.05, time.monotonic() + RETRY_LIMIT_SECONDS
        todo, refused = list(applies), []
        while todo:
            replies = await self.dst.per_key(db, todo, lambda k: [applies[k]], 1)
            retry = []
            for key, (reply,) in zip(todo, replies):
                if isinstance(reply, ReplyError):
                    if not str(reply).startswith(RETRYABLE_PREFIXES):
                        self._no_member_copies("target", reply)
                        refused.append(key)
                        continue
                    retry.append(key)
                elif reply != 1:
                    refused.append(key)
            todo = retry
            if todo:
                delay = await _back_off(deadline, delay)
        return refused

    def _no_member_copies(self, side: str, reply: ReplyError) -> None:
        """A member script refused (scripting not allowed to our user, a server without a command it
        uses): copy whole keys from now on. Whatever else is wrong with the server, the whole copy
        reports it."""
        if self.member_copies:
            log.warning("member copies unavailable, copying whole keys", side=side, reason=str(reply)[:200])
        self.member_copies = False

    @staticmethod
    def _estimate_timings(batch: RestoreBatch, elapsed: float, result: MoveResult) -> None:
        """A big key's share of the batch's fetch+restore time, by payload bytes: one round trip
        serves the whole batch, so this is the best per-key figure there is (and exact for a batch
        that is one big key, the hot-key case)."""
        for key, size in batch.timed:
            result.timings.append((key, elapsed * size / batch.bytes))

    async def _fetch(self, db: int, keys: Sequence[bytes], strings: Container[bytes], batch: RestoreBatch) -> None:
        """Read the keys from the source into the batch: one round trip per source primary, plus one
        for the few keys the fast paths could not read."""
        todo: list[bytes] = list(keys)
        if self.use_scripts:
            left = await _all([self._fetch_group(primary, db, group, strings, batch)
                               for primary, group in self.src.by_primary(keys).items()])
            todo = [k for group in left for k in group] + batch.unread
        if todo:
            batch.add_dumps(todo, *zip(*await self._fetch_pipelined(db, todo)))
        batch.close()

    async def _fetch_group(self, primary: int, db: int, group: list[bytes], strings: Container[bytes],
                           batch: RestoreBatch) -> list[bytes]:
        """Hinted strings read as values, the other keys by the FETCH script, in one pipeline to one
        source primary. Returns the keys left for the pipelined path."""
        limit = self.opts.big_key_bytes
        plain = [k for k in group if k in strings] if strings else []
        scripted = [k for k in group if k not in strings] if plain else group
        read = self._read_string
        data = b"".join([read % (len(k), k, len(k), k) for k in plain])
        if scripted:
            data += pack([_script_call(FETCH, limit, scripted)])
        conn = await self.src.conn(primary, db)
        replies = await conn.pipeline_raw(data, 2 * len(plain) + (1 if scripted else 0))
        if plain:
            n = 2 * len(plain)
            batch.add_values(plain, replies[1:n:2], replies[0:n:2])
        if scripted:
            reply = replies[-1]
            if isinstance(reply, ReplyError):
                self._script_failed("source", reply)
                return scripted
            batch.add_dumps(scripted, reply[0::2], reply[1::2])
        return []

    async def _fetch_pipelined(self, db: int, keys: list[bytes]) -> list[tuple[int, Any]]:
        """The script-free path (Redis < 7, or keys mid-migration between cluster nodes)."""
        sizes = await self.src.per_key(db, keys, lambda k: [("MEMORY", "USAGE", k)], 1)
        small = [k for k, (size,) in zip(keys, sizes) if isinstance(size, int) and size <= self.opts.big_key_bytes]
        dumps = dict(zip(small, await self.src.per_key(db, small, lambda k: [(self.expire_cmd, k), ("DUMP", k)], 2)))
        out: list[tuple[int, Any]] = []
        for key, (size,) in zip(keys, sizes):
            if not isinstance(size, int):
                out.append((-2, None))
            elif key not in dumps:
                out.append((-3, None))
            else:
                expiry, payload = dumps[key]
                for r in (expiry, payload):
                    if isinstance(r, ReplyError):
                        raise ServerError(f"source: DUMP failed: {r}")
                out.append((expiry, payload) if payload is not None else (-2, None))
        return out

    async def _restore_all(self, db: int, batch: RestoreBatch) -> list[bytes]:
        """The common case in one pipeline per target primary; anything but OK (a moved slot, a
        transient rejection, an unreadable payload) goes through the careful path, _write_retrying."""

        async def one(primary: int, group: WriteGroup) -> list[int]:
            conn = await self.dst.conn(primary, db)
            replies = await conn.pipeline_packed(b"".join(group.parts), group.count)
            return [] if replies is None else [i for i, r in enumerate(replies) if r != b"OK"]

        groups = list(batch.groups.items())
        failed = await _all([one(p, g) for p, g in groups])
        by_key: dict[bytes, list[bytes]] = {}
        for (_, group), idxs in zip(groups, failed):
            for i in idxs:
                command = group.command(i)
                by_key[command[1]] = command
        unreadable: list[bytes] = []
        if by_key:
            await self._write_retrying(db, list(by_key), lambda k: [by_key[k]], unreadable)
        return unreadable

    def _script_failed(self, side: str, reply: ReplyError) -> None:
        text = str(reply)
        if "non local key" in text or text.startswith(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")):
            return  # keys moving between nodes: this batch takes the pipelined path, scripts stay on
        # Scripts unusable on this server (Redis < 7, scripting disabled): use pipelines from now on.
        log.info("scripted copy unavailable, using pipelines", side=side, reason=text[:200])
        self.use_scripts = False

    async def _throttle_target(self, batch: RestoreBatch) -> None:
        if not self.target_bytes:
            return
        for p, group in batch.groups.items():
            bucket = self.target_bytes.get(p)
            if bucket:
                await bucket.take(group.bytes)

    async def _delete(self, db: int, keys: list[bytes]) -> None:
        await self._write_retrying(db, keys, lambda k: [("DEL", k)])

    async def _write_retrying(self, db: int, keys: Sequence[bytes], build: Any,
                              unreadable: list[bytes] | None = None) -> None:
        """Write to the target; transient rejections (e.g. an async-durable target over its durability
        lag) are retried with exponential backoff, never dropped. With `unreadable`, keys whose DUMP
        payload the target cannot read are collected there instead of failing."""
        delay = 0.05
        deadline = time.monotonic() + RETRY_LIMIT_SECONDS
        todo = list(keys)
        while todo:
            replies = await self.dst.per_key(db, todo, build, len(build(todo[0])))
            retry = []
            for key, rs in zip(todo, replies):
                error = next((str(r) for r in rs if isinstance(r, ReplyError)), None)
                if error is None:
                    continue
                if unreadable is not None and ("payload version" in error or "checksum" in error):
                    unreadable.append(key)
                elif error.startswith(RETRYABLE_PREFIXES):
                    retry.append(key)
                else:
                    raise ServerError(f"target: {build(key)[0][0]} failed: {error}")
            todo = retry
            if todo:
                delay = await _back_off(deadline, delay)

    async def _dst(self, db: int, key: bytes, *commands: Any, size: int = 0) -> None:
        bucket = self.target_bytes.get(self.dst.topology.primary_for(key))
        if bucket and size:
            await bucket.take(size)
        await self._write_retrying(db, [key], lambda _k: list(commands))

    async def copy_chunked(self, db: int, key: bytes, result: MoveResult) -> None:
        """Rebuild one key on the target element by element."""
        started = time.monotonic()
        try:
            await self._copy_chunked(db, key, result)
        finally:
            result.timings.append((key, time.monotonic() - started))

    async def _copy_chunked(self, db: int, key: bytes, result: MoveResult) -> None:
        ktype = (await self.src.on_key(db, key, ("TYPE", key)))[0]
        ktype = ktype.decode() if isinstance(ktype, bytes) else str(ktype)
        await self._dst(db, key, ("DEL", key))
        if ktype == "none":
            result.deleted += 1
            return
        copy = getattr(self, f"_chunk_{ktype}", None)
        if copy is None:
            raise ServerError(f"source: key {key[:60]!r} has type {ktype!r}, which cannot be copied in chunks")
        result.bytes += await copy(db, key)
        expiry = (await self.src.on_key(db, key, (self.expire_cmd, key)))[0]
        abs_ms = _absolute_expiry(self.expire_cmd, expiry, int(time.time() * 1000))
        if expiry == -2:
            await self._dst(db, key, ("DEL", key))
            result.deleted += 1
            return
        if abs_ms:
            await self._dst(db, key, ("PEXPIREAT", key, abs_ms))
        result.copied += 1
        result.big += 1

    async def _src(self, db: int, key: bytes, *command: Any) -> Any:
        await self.source_ops.take(1)
        reply = (await self.src.on_key(db, key, command))[0]
        if isinstance(reply, ReplyError):
            raise ServerError(f"source: {command[0]} failed: {reply}")
        return reply

    async def _chunk_string(self, db: int, key: bytes) -> int:
        length = await self._src(db, key, "STRLEN", key)
        step = self.opts.chunk_bytes
        for off in range(0, max(length, 1), step):
            part = await self._src(db, key, "GETRANGE", key, off, off + step - 1)
            await self._dst(db, key, ("APPEND", key, part), size=len(part))
        return int(length)

    async def _scan_copy(self, db: int, key: bytes, scan: str, write: str, pairs: bool, swap: bool,
                         field_ttls: bool = False) -> int:
        cursor, total = b"0", 0
        for _ in range(1 << 30):  # bounded by SCAN's own termination; the range is a safety net
            cursor, items = await self._src(db, key, scan, key, cursor, "COUNT", self.opts.chunk_elements)
            if items:
                if swap:  # ZSCAN yields member, score; ZADD wants score, member
                    items = [x for i in range(0, len(items), 2) for x in (items[i + 1], items[i])]
                size = sum(len(x) for x in items)
                total += size
                await self._dst(db, key, (write, key, *items), size=size)
                if field_ttls:
                    await self._copy_field_expiries(db, key, items[::2])
            if cursor in (b"0", 0, "0"):
                return total
        return total

    async def _chunk_hash(self, db: int, key: bytes) -> int:
        return await self._scan_copy(db, key, "HSCAN", "HSET", True, False, field_ttls=self.src.topology.field_ttl)

    async def _copy_field_expiries(self, db: int, key: bytes, fields: list[bytes]) -> None:
        """Valkey 9: each hash field may carry its own expiry; HSET wrote the chunk's fields without it.
        Their absolute expiry (unix ms) is copied as it is, like a key's."""
        times = await self._src(db, key, "HPEXPIRETIME", key, "FIELDS", len(fields), *fields)
        at: dict[int, list[bytes]] = {}
        for field, when in zip(fields, times):
            if isinstance(when, int) and when > 0:
                at.setdefault(when, []).append(field)
        if at:
            await self._dst(db, key, *(("HPEXPIREAT", key, when, "FIELDS", len(fs), *fs) for when, fs in at.items()))

    async def _chunk_set(self, db: int, key: bytes) -> int:
        return await self._scan_copy(db, key, "SSCAN", "SADD", False, False)

    async def _chunk_zset(self, db: int, key: bytes) -> int:
        return await self._scan_copy(db, key, "ZSCAN", "ZADD", True, True)

    async def _chunk_list(self, db: int, key: bytes) -> int:
        total, start, step = 0, 0, self.opts.chunk_elements
        while True:
            items = await self._src(db, key, "LRANGE", key, start, start + step - 1)
            if not items:
                return total
            size = sum(len(x) for x in items)
            total += size
            await self._dst(db, key, ("RPUSH", key, *items), size=size)
            start += len(items)

    async def _chunk_stream(self, db: int, key: bytes) -> int:
        total, start = 0, "-"
        while True:
            entries = await self._src(db, key, "XRANGE", key, start, "+", "COUNT", self.opts.chunk_elements)
            if not entries:
                break
            for entry_id, fields in entries:
                total += sum(len(x) for x in fields)
                await self._dst(db, key, ("XADD", key, entry_id, *fields), size=len(entry_id))
            start = "(" + entries[-1][0].decode()
        await self._copy_stream_meta(db, key)
        return total

    async def _copy_stream_meta(self, db: int, key: bytes) -> None:
        info = reply_map(await self._src(db, key, "XINFO", "STREAM", key))
        setid: list[Any] = ["XSETID", key, info[b"last-generated-id"]]
        if b"entries-added" in info:
            setid += ["ENTRIESADDED", info[b"entries-added"], "MAXDELETEDID", info[b"max-deleted-entry-id"]]
        await self._dst(db, key, tuple(setid))
        for group in await self._src(db, key, "XINFO", "GROUPS", key):
            g = reply_map(group)
            create: list[Any] = ["XGROUP", "CREATE", key, g[b"name"], g[b"last-delivered-id"]]
            if g.get(b"entries-read") is not None:
                create += ["ENTRIESREAD", g[b"entries-read"]]
            await self._dst(db, key, tuple(create))
            await self._copy_pending(db, key, g[b"name"])

    async def _copy_pending(self, db: int, key: bytes, group: bytes) -> None:
        for consumer in await self._src(db, key, "XINFO", "CONSUMERS", key, group):
            c = reply_map(consumer)
            await self._dst(db, key, ("XGROUP", "CREATECONSUMER", key, group, c[b"name"]))
        start = "-"
        while True:
            pending = await self._src(db, key, "XPENDING", key, group, start, "+", self.opts.chunk_elements)
            if not pending:
                return
            for entry_id, consumer, idle, deliveries in pending:
                await self._dst(db, key, ("XCLAIM", key, group, consumer, 0, entry_id, "IDLE", idle,
                                          "RETRYCOUNT", deliveries, "FORCE", "JUSTID"))
            start = "(" + pending[-1][0].decode()


def _apply_args(state: list[Any], ttls: bytes, members: list[bytes]) -> list[Any] | None:
    """APPLY_MEMBERS' ARGV from a READ_MEMBERS reply; None: a type without members (copy it whole)."""
    ktype, expiry, values = state[0], state[1], state[2:]
    if ktype == b"none":
        return [b"none", -2, ttls, *members]
    if ktype not in MEMBER_TYPES:
        return None
    argv: list[Any] = [ktype, expiry, ttls]
    if ktype == b"zset":
        for member, score in zip(members, values):
            argv += (member, b"" if score is None else score)
    elif ktype == b"set":
        for member, there in zip(members, values):
            argv += (member, b"1" if there == 1 else b"0")
    else:
        for i, field in enumerate(members):
            value, at = values[2 * i], values[2 * i + 1]
            argv += (field, b"0", b"", -1) if value is None else (field, b"1", value, at if at > 0 else -1)
    return argv


async def _all(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """asyncio.gather, minus its task per coroutine when there is only one (a standalone server)."""
    if len(coros) == 1:
        return [await coros[0]]
    return await asyncio.gather(*coros)


def _script_call(script: str, first: Any, args: Sequence[Any]) -> tuple[Any, ...]:
    head = () if first is None else (first,)
    return ("EVAL", script, 0, *head, *args)


def _absolute_expiry(cmd: str, reply: Any, sent_ms: int) -> int:
    """0 for no expiry, else the absolute unix time in ms."""
    value = int(reply)
    if value < 0:
        return 0
    return value if cmd == "PEXPIRETIME" else sent_ms + value


async def _back_off(deadline: float, delay: float) -> float:
    """Wait ``delay`` before writes the target rejected for now are tried again; the next delay.
    Past ``deadline`` the target is given up on."""
    if time.monotonic() > deadline:
        raise ServerError(f"target kept rejecting writes for {RETRY_LIMIT_SECONDS:.0f}s")
    await asyncio.sleep(delay)
    return min(delay * 2, 5.0)
