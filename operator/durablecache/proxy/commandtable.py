"""Which commands write, and where their keys are — learned from the upstream's own ``COMMAND`` reply.

Nothing here is a hand-written list of commands: a command "holds" (is treated as a write) when the
server flags it ``write`` or one of its key specs has a write flag (RW/OW/RM/insert/delete/update,
which covers EVAL/FCALL's declared keys), and the keys to mark are the ones those write key specs
find. Key specs (Redis/Valkey 7+) are compiled once into small extractor functions; servers without
key specs (Redis 6) fall back to the legacy first/last/step positions. Where a write key spec cannot
be resolved from the arguments (``incomplete`` or ``unknown``, e.g. ``SORT ... STORE``, or a
``movablekeys`` command on a server without key specs) the proxy asks the server itself with
``COMMAND GETKEYSANDFLAGS`` (``COMMAND GETKEYS`` before 7.0), pipelined ahead of the command.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..resp import reply_text_map, text
from .fanout import Policy, policy_from_tips
from .members import MEMBER_KEY_INDEXES, MEMBER_PATH

Args = Sequence[bytes]
KeyFn = Callable[[Args], list[bytes]]

WRITE_KEY_FLAGS = frozenset({"RW", "OW", "RM", "insert", "delete", "update"})
# The one exception to "nothing is a hand list": a command whose unresolvable write key spec is
# introduced by a keyword (COMMAND DOCS: SORT's destination is the argument after STORE). Without the
# keyword it writes nothing, so it needs no GETKEYS (and a plain SORT stays allowed inside MULTI).
GETKEYS_ONLY_WITH = {b"sort": b"STORE"}
# Tipped all_shards/all_nodes, yet sent to one node: PING checks the connection a client holds (a
# cluster client pings the node it talks to), CLIENT SETNAME/SETINFO are the proxy's own (handlers.py).
NOT_FANNED_OUT = frozenset({"ping", "client|setname", "client|setinfo"})
# Untipped, yet about the whole keyspace: a pause that left the other shards taking writes would not
# be the pause the client asked for.
EXTRA_FANOUT = {"client|pause": Policy("all_nodes", "all_succeeded"),
                "client|unpause": Policy("all_nodes", "all_succeeded")}
SUBSCRIBE_FAMILY = {b"subscribe": 0, b"psubscribe": 1, b"ssubscribe": 2,
                    b"unsubscribe": 0, b"punsubscribe": 1, b"sunsubscribe": 2}


class CommandSpec:
    __slots__ = ("name", "flags", "hold", "blocking", "write_keys", "route_keys", "needs_getkeys",
                 "subcommands", "pubsub", "keys_all_written", "key_index", "getkeys_keyword", "fanout")

    def __init__(self, name: bytes, flags: frozenset[str]):
        self.name = name
        self.flags = flags
        self.hold = False                     # a write: held during FREEZE, marked after its reply
        self.blocking = "blocking" in flags
        self.write_keys: KeyFn = _no_keys     # keys this command may modify
        self.route_keys: KeyFn = _no_keys     # every key (and shard channel), for cluster routing
        self.needs_getkeys = False            # write keys only the server can resolve
        self.subcommands: dict[bytes, CommandSpec] = {}
        self.pubsub = name in SUBSCRIBE_FAMILY
        self.keys_all_written = False         # flagged write, no key spec says which key: all of them
        self.key_index = -1                   # >0: the one write key is always args[key_index] (SET, INCR…)
        self.getkeys_keyword: bytes | None = None   # needs_getkeys only when this keyword is present
        self.fanout: Policy | None = None     # cluster mode: sent to every primary (fanout.py)

    def unresolved(self, args: Args) -> bool:
        """Are this request's write keys known only to the server (COMMAND GETKEYSANDFLAGS)?"""
        if not self.needs_getkeys:
            return False
        kw = self.getkeys_keyword
        return kw is None or any(a.upper() == kw for a in args[2:])


def _no_keys(_args: Args) -> list[bytes]:
    return []


def _compile_spec(spec: dict[str, Any]) -> KeyFn | None:
    """One key spec -> function(args) -> keys; None when the spec cannot be resolved from args."""
    bs = reply_text_map(spec.get("begin_search") or [])
    fk = reply_text_map(spec.get("find_keys") or [])
    bs_type, fk_type = text(bs.get("type", "unknown")), text(fk.get("type", "unknown"))
    bs_spec, fk_spec = reply_text_map(bs.get("spec") or []), reply_text_map(fk.get("spec") or [])
    if bs_type == "index":
        index = int(bs_spec["index"])

        def start(args: Args) -> int | None:
            return index if index < len(args) else None
    elif bs_type == "keyword":
        keyword = text(bs_spec["keyword"]).upper().encode()
        startfrom = int(bs_spec["startfrom"])

        def start(args: Args) -> int | None:
            n = len(args)
            rng = range(startfrom, n) if startfrom >= 0 else range(n + startfrom, 0, -1)
            for i in rng:
                if 0 < i < n and args[i].upper() == keyword:
                    return i + 1
            return None
    else:
        return None
    if fk_type == "range":
        lastkey, step, limit = int(fk_spec["lastkey"]), int(fk_spec["keystep"]), int(fk_spec["limit"])
        if bs_type == "index" and lastkey == 0:   # the common case: one key at a fixed position
            def one(args: Args) -> list[bytes]:
                return [args[index]] if index < len(args) else []
            one.key_index = index  # type: ignore[attr-defined]  # lets the proxy skip the call
            return one

        def range_keys(args: Args) -> list[bytes]:
            first = start(args)
            if first is None:
                return []
            n = len(args)
            if lastkey >= 0:
                last = first + lastkey
            elif limit <= 1:
                last = n + lastkey
            else:
                last = first + (n - first) // limit - 1
            return list(args[first:min(last, n - 1) + 1:max(step, 1)])
        return range_keys
    if fk_type == "keynum":
        numidx, firstkey, step = int(fk_spec["keynumidx"]), int(fk_spec["firstkey"]), int(fk_spec["keystep"])

        def keynum_keys(args: Args) -> list[bytes]:
            first = start(args)
            if first is None or first + numidx >= len(args):
                return []
            try:
                count = int(args[first + numidx])
            except ValueError:
                return []
            lo = first + firstkey
            return list(args[lo:min(lo + count * max(step, 1), len(args)):max(step, 1)])
        return keynum_keys
    return None


def _single_key_index(ks: dict[str, Any]) -> int:
    """The argument index of a key spec that finds exactly one key at a fixed position; -1 otherwise."""
    bs = reply_text_map(ks.get("begin_search") or [])
    fk = reply_text_map(ks.get("find_keys") or [])
    if text(bs.get("type", "")) != "index" or text(fk.get("type", "")) != "range":
        return -1
    if int(reply_text_map(fk.get("spec") or []).get("lastkey", -1)) != 0:
        return -1
    return int(reply_text_map(bs.get("spec") or []).get("index", -1))


def _concat(fns: list[KeyFn]) -> KeyFn:
    if not fns:
        return _no_keys
    if len(fns) == 1:
        return fns[0]

    def keys(args: Args) -> list[bytes]:
        out: list[bytes] = []
        for fn in fns:
            out.extend(fn(args))
        return out
    return keys


def _legacy(first: int, last: int, step: int) -> KeyFn:
    if first <= 0:
        return _no_keys

    def keys(args: Args) -> list[bytes]:
        end = last if last >= 0 else len(args) + last
        return list(args[first:min(end, len(args) - 1) + 1:max(step, 1)])
    return keys


def _build(entry: Sequence[Any], has_key_specs: bool) -> CommandSpec:
    name = text(entry[0]).lower()
    flags = frozenset(text(f) for f in entry[2])
    spec = CommandSpec(name.split("|")[-1].encode(), flags)
    write_fns: list[KeyFn] = []
    all_fns: list[KeyFn] = []
    unresolved_write = False
    any_write_spec = False
    key_specs = entry[8] if len(entry) > 8 else []
    single_key_at: list[int] = []      # begin_search index of each spec that finds exactly one key
    if has_key_specs:
        for raw in key_specs or []:
            ks = reply_text_map(raw)
            single_key_at.append(_single_key_index(ks))
            kflags = {text(f) for f in ks.get("flags") or []}
            writes = bool(kflags & WRITE_KEY_FLAGS)
            any_write_spec |= writes
            fn = _compile_spec(ks)
            if fn is None or "incomplete" in kflags:
                unresolved_write |= writes
                if fn is None:
                    continue
            all_fns.append(fn)
            if writes:
                write_fns.append(fn)
        if "write" in flags and not any_write_spec:
            # e.g. XREADGROUP: flagged write, its key spec says RO; the PEL changes, so mark its keys.
            write_fns = list(all_fns)
    else:
        legacy = _legacy(int(entry[3]), int(entry[4]), int(entry[5]))
        all_fns = [legacy]
        if "write" in flags:
            write_fns = [legacy]
            unresolved_write = "movablekeys" in flags
    spec.hold = "write" in flags or any_write_spec
    spec.keys_all_written = "write" in flags and not any_write_spec
    spec.write_keys = _concat(write_fns)
    spec.key_index = getattr(spec.write_keys, "key_index", -1)
    members = MEMBER_PATH.get(spec.name) if "|" not in name else None
    if members is not None and spec.hold and not unresolved_write \
            and tuple(single_key_at) == MEMBER_KEY_INDEXES[spec.name]:
        # Member-level marks (members.py): only where the server's key specs are the ones the
        # member table was written for; the fast path then calls write_keys (no fixed key index).
        spec.write_keys = members
        spec.key_index = -1
    spec.route_keys = _concat(all_fns)
    if name not in NOT_FANNED_OUT:
        spec.fanout = EXTRA_FANOUT.get(name) or policy_from_tips(entry[7] if len(entry) > 7 else ())
    spec.needs_getkeys = unresolved_write
    if unresolved_write and has_key_specs:
        spec.getkeys_keyword = GETKEYS_ONLY_WITH.get(spec.name)
    if len(entry) > 9:
        for sub in entry[9] or []:
            child = _build(sub, has_key_specs)
            spec.subcommands[child.name] = child
    return spec


class CommandTable:
    """``lookup(args)`` -> the CommandSpec for a request (subcommand resolved), or None if unknown."""

    def __init__(self, command_reply: Sequence[Any], version: tuple[int, ...]):
        self.has_key_specs = version >= (7, 0)
        self.getkeys_cmd = (b"COMMAND", b"GETKEYSANDFLAGS") if self.has_key_specs else (b"COMMAND", b"GETKEYS")
        self.specs: dict[bytes, CommandSpec] = {}
        for entry in command_reply:
            spec = _build(entry, self.has_key_specs)
            self.specs[spec.name] = spec

    def lookup(self, args: Args) -> CommandSpec | None:
        spec = self.specs.get(args[0].lower())
        if spec is not None and spec.subcommands and len(args) > 1:
            return spec.subcommands.get(args[1].lower(), spec)
        return spec

    def __len__(self) -> int:
        return len(self.specs)


def keys_from_getkeys(reply: Any, spec: CommandSpec) -> list[bytes]:
    """Write keys from a COMMAND GETKEYSANDFLAGS ([[key, [flags]], ...]) or GETKEYS ([key, ...]) reply."""
    if not isinstance(reply, list):
        return []   # "the command has no key arguments" and similar errors
    keys: list[bytes] = []
    everything: list[bytes] = []
    for item in reply:
        if isinstance(item, list):
            key, kflags = item[0], {text(f) for f in item[1]}
            everything.append(key)
            if kflags & WRITE_KEY_FLAGS:
                keys.append(key)
        else:
            everything.append(item)
            keys.append(item)
    if not keys and spec.keys_all_written:
        return everything
    return keys
