"""How the proxy treats each command name, next to the command table it is read from: the fast path's
classes (``FastMap``), the commands whose replies can be counted instead of framed, and the names
whose effect a migration cannot track. Which names the proxy answers or watches itself is the key set
of the handler table (``handlers.SPECIAL``), handed to ``FastMap``."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Final

from .commandtable import CommandTable

# Module constants are Final: compiled, each use is then a constant, not a module-dict lookup.
FAST_READ: Final = "read"
FAST_NO: Final = "general"
FASTMAP_SPELLINGS: Final = 4096  # command names (as clients spell them) whose fast-path class is remembered
# Commands whose reply is one non-aggregate frame (RESP2) whatever their arguments. A run made only of
# them has its replies counted (framing.count_scalars, in Upstream._count) instead of framed.
SCALAR_REPLY: Final = frozenset(
    b"get set setnx setex psetex getset getdel getex append strlen incr incrby incrbyfloat decr decrby "
    b"del unlink exists touch expire pexpire expireat pexpireat persist ttl pttl expiretime pexpiretime "
    b"getrange setrange getbit setbit bitcount pfadd pfcount hget hset hsetnx hdel hlen hexists hincrby "
    b"hincrbyfloat hstrlen sadd srem scard sismember zadd zrem zcard zscore zincrby zcount lpush rpush "
    b"lpushx rpushx llen lindex lset ltrim lrem mset msetnx".split())
# Refused during a migration: their effect cannot be tracked key by key (guards.refuse_if_migrating).
UNSAFE: Final = frozenset({b"flushall", b"flushdb", b"swapdb", b"move"})
# Checked during a migration (scripts.py, guards.py): the general path then, the fast path otherwise.
SCRIPTING: Final = frozenset({b"eval", b"evalsha", b"fcall", b"eval_ro", b"evalsha_ro", b"fcall_ro"})


class FastMap:
    """The fast-path class of each command name as clients spell it, learned on first use from one
    command table (a FLIP makes a new map: sessions notice by identity and drop their cached class)."""

    def __init__(self, table: CommandTable, handled: Collection[bytes], migrating: bool, cluster: bool = False):
        self.table = table
        self.cluster = cluster          # commands sent to every primary take the general path
        self.handled = handled          # answered or watched by the proxy itself (handlers.SPECIAL)
        self.migrating = migrating
        self.codes: dict[bytes, Any] = {}
        self.scalar: set[bytes] = set()   # SCALAR_REPLY as the clients spell the names

    def classify(self, name: bytes) -> Any:
        """Fast-path class of a command name as the client spelled it: FAST_READ, FAST_NO (the general
        path: special handling, subcommands, unknown), an int for a plain write whose one key is
        always at that index (SET, INCR …), or the CommandSpec of another plain write."""
        code = self.codes.get(name)
        if code is None:
            low = name.lower()
            spec = self.table.specs.get(low)
            if (spec is None or spec.subcommands or spec.pubsub or (self.cluster and spec.fanout is not None)
                    or (low in self.handled and (self.migrating or low not in SCRIPTING))):
                code = FAST_NO
            elif spec.blocking and not spec.hold:
                # XREAD BLOCK, WAIT, WAITAOF: an entry of their own (general path), never inside a
                # run with writes, whose replies (and freeze) would wait for them.
                code = FAST_NO
            elif not spec.hold:
                code = FAST_READ
            elif spec.needs_getkeys:
                code = FAST_NO
            elif spec.key_index > 0 and not spec.blocking:
                code = spec.key_index
            else:
                code = spec
            if len(self.codes) < FASTMAP_SPELLINGS:   # bounded: a client could spell names endlessly
                self.codes[name] = code
                if low in SCALAR_REPLY:
                    self.scalar.add(name)
        return code
