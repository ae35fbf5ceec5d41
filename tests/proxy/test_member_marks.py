"""Member-level marks in the proxy: which commands take the member path (held to each server's
COMMAND DOCS, so that a new or changed command cannot silently take it), what they mark, and how the
marks travel (the MARK frame's [key, member] arrays, in C and in the reference)."""

from __future__ import annotations

import asyncio
import copy
import random
from typing import Any

import libvalkey
import pytest
import valkey

from durablecache.proxy import MarkServer, RemoteMarks, _resp
from durablecache.proxy.commandtable import CommandTable
from durablecache.proxy.marks import encode_marks
from durablecache.proxy.members import MEMBER_PATH, WHOLE_KEY, MemberMark
from durablecache.resp import reply_text_map, text
from durablecache.testing.localvalkey import LocalServer

ENGINES = ["valkey8", "valkey9", "redis7"]
MEMBER_GROUPS = {"hash", "set", "sorted-set", "sorted_set"}
# The shape of each member command's arguments in COMMAND DOCS (token, type, flags; names differ
# between servers and do not matter), as the extractors in members.py were written for it.
SHAPES = {
    b"hset": "key block(string string)[multiple]",
    b"hsetnx": "key string string",
    b"hmset": "key block(string string)[multiple]",
    b"hdel": "key string[multiple]",
    b"hincrby": "key string integer",
    b"hincrbyfloat": "key string double",
    b"hsetex": "key oneof(NX pure-token XX pure-token)[optional] oneof(FNX pure-token FXX pure-token)[optional] "
               "oneof(EX integer PX integer EXAT unix-time PXAT unix-time KEEPTTL pure-token)[optional] "
               "FIELDS block(integer block(string string)[multiple])",
    b"hgetex": "key oneof(EX integer PX integer EXAT unix-time PXAT unix-time PERSIST pure-token)[optional] "
               "FIELDS block(integer string[multiple])",
    b"hexpire": "key integer oneof(NX pure-token XX pure-token GT pure-token LT pure-token)[optional] "
                "FIELDS block(integer string[multiple])",
    b"hpexpire": "key integer oneof(NX pure-token XX pure-token GT pure-token LT pure-token)[optional] "
                 "FIELDS block(integer string[multiple])",
    b"hexpireat": "key integer oneof(NX pure-token XX pure-token GT pure-token LT pure-token)[optional] "
                  "FIELDS block(integer string[multiple])",
    b"hpexpireat": "key integer oneof(NX pure-token XX pure-token GT pure-token LT pure-token)[optional] "
                   "FIELDS block(integer string[multiple])",
    b"hpersist": "key FIELDS block(integer string[multiple])",
    b"hgetdel": "key FIELDS block(integer string[multiple])",
    b"sadd": "key string[multiple]",
    b"srem": "key string[multiple]",
    b"smove": "key key string",
    b"zadd": "key oneof(NX pure-token XX pure-token)[optional] oneof(GT pure-token LT pure-token)[optional] "
             "CH pure-token[optional] INCR pure-token[optional] block(double string)[multiple]",
    b"zincrby": "key integer string",
    b"zrem": "key string[multiple]",
}


def _shape(arguments: Any) -> str:
    out = []
    for raw in arguments or []:
        a = reply_text_map(raw)
        s = (text(a["token"]) + " " if a.get("token") else "") + text(a["type"])
        if a.get("arguments"):
            s += "(" + _shape(a["arguments"]) + ")"
        flags = sorted(text(f) for f in a.get("flags") or [])
        if flags:
            s += "[" + ",".join(flags) + "]"
        out.append(s)
    return " ".join(out)


def _raw(server: LocalServer, *command: str) -> Any:
    conn = server.client().connection_pool.get_connection("COMMAND")
    try:
        conn.send_command(*command)
        return conn.read_response()
    finally:
        conn.disconnect()


@pytest.fixture(scope="module", params=ENGINES)
def server_commands(request: pytest.FixtureRequest) -> Any:
    server = LocalServer(engine=request.param).start()
    try:
        docs = _raw(server, "COMMAND", "DOCS")
        info = _raw(server, "COMMAND", "INFO")
        version = tuple(int(x) for x in server.client().info("server")["redis_version"].split("."))
        yield request.param, dict(zip(docs[0::2], docs[1::2])), info, version
    finally:
        server.stop()


def test_every_write_to_a_member_type_is_in_one_list_and_member_commands_keep_their_shape(server_commands) -> None:
    engine, docs, info, _ = server_commands
    writes = {text(e[0]).lower().encode() for e in info if "write" in {text(f) for f in e[2]}}
    unlisted, changed = [], {}
    for name, raw in docs.items():
        d = reply_text_map(raw)
        name = name.lower()
        if text(d.get("group", "")) not in MEMBER_GROUPS or name not in writes:
            continue
        if name not in MEMBER_PATH and name not in WHOLE_KEY:
            unlisted.append(name)        # a new command: classify it (members.py) before it is used
        elif name in MEMBER_PATH and _shape(d.get("arguments")) != SHAPES[name]:
            changed[name] = _shape(d.get("arguments"))
    assert not unlisted, f"{engine}: write commands of member types in neither list: {unlisted}"
    assert not changed, f"{engine}: member commands whose arguments changed: {changed}"
    if engine == "valkey9":
        assert set(MEMBER_PATH) <= set(docs), set(MEMBER_PATH) - set(docs)


def test_the_command_table_takes_the_member_path_for_those_commands_only(server_commands) -> None:
    engine, docs, info, version = server_commands
    table = CommandTable(info, version)
    member_fns = set(MEMBER_PATH.values())
    on_member_path = {name for name, spec in table.specs.items() if spec.write_keys in member_fns}
    assert on_member_path == set(MEMBER_PATH) & set(table.specs), engine
    assert all(table.specs[n].key_index == -1 for n in on_member_path)
    for spec in table.specs.values():          # subcommands too: none of them
        assert all(sub.write_keys not in member_fns for sub in spec.subcommands.values())
    zincrby = table.lookup([b"ZINCRBY", b"lb", b"5", b"p1"])
    marks = zincrby.write_keys([b"ZINCRBY", b"lb", b"5", b"p1"])
    assert marks == [b"lb"] and isinstance(marks[0], MemberMark) and marks[0].member == b"p1"
    pop = table.lookup([b"ZPOPMIN", b"lb"]).write_keys([b"ZPOPMIN", b"lb"])
    assert pop == [b"lb"] and type(pop[0]) is bytes


def test_a_member_command_whose_key_specs_differ_takes_the_whole_key_path(server_commands) -> None:
    _, _, info, version = server_commands
    entry = copy.deepcopy(next(e for e in info if text(e[0]).lower() == "zadd"))
    spec = entry[8][0]
    begin = spec[spec.index(b"begin_search") + 1]
    index_spec = begin[begin.index(b"spec") + 1]
    index_spec[index_spec.index(b"index") + 1] = 2      # as if the key moved one argument to the right
    table = CommandTable([entry], version)
    marks = table.specs[b"zadd"].write_keys([b"ZADD", b"x", b"lb", b"1", b"m"])
    assert marks == [b"lb"] and type(marks[0]) is bytes


def _marks(args: list[bytes]) -> list[tuple[bytes, bytes | None]]:
    out = MEMBER_PATH[args[0].lower()](args)
    return [(bytes(m), m.member if isinstance(m, MemberMark) else None) for m in out]


@pytest.mark.parametrize(("args", "expected"), [
    ([b"HSET", b"h", b"a", b"1", b"b", b"2"], [(b"h", b"a"), (b"h", b"b")]),
    ([b"HINCRBY", b"h", b"a", b"1"], [(b"h", b"a")]),
    ([b"HDEL", b"h", b"a", b"b"], [(b"h", b"a"), (b"h", b"b")]),
    ([b"HSETEX", b"h", b"FNX", b"EX", b"10", b"FIELDS", b"2", b"a", b"1", b"FIELDS", b"2"],
     [(b"h", b"a"), (b"h", b"FIELDS")]),
    ([b"HSETEX", b"h", b"KEEPTTL", b"FIELDS", b"2", b"a", b"1"], [(b"h", None)]),   # miscounted: whole key
    ([b"HGETEX", b"h", b"PERSIST", b"FIELDS", b"1", b"a"], [(b"h", b"a")]),
    ([b"HEXPIRE", b"h", b"10", b"NX", b"FIELDS", b"2", b"a", b"b"], [(b"h", b"a"), (b"h", b"b")]),
    ([b"HPEXPIREAT", b"h", b"FIELDS", b"FIELDS", b"1", b"a"], [(b"h", b"a")]),   # the time is not FIELDS
    ([b"HPERSIST", b"h", b"FIELDS", b"x", b"a"], [(b"h", None)]),
    ([b"HGETDEL", b"h", b"FIELDS", b"1", b"a"], [(b"h", b"a")]),
    ([b"SADD", b"s", b"m1", b"m2"], [(b"s", b"m1"), (b"s", b"m2")]),
    ([b"SMOVE", b"s", b"t", b"m"], [(b"s", b"m"), (b"t", b"m")]),
    ([b"ZADD", b"z", b"xx", b"ch", b"INCR", b"1.5", b"m"], [(b"z", b"m")]),
    ([b"ZADD", b"z", b"NX", b"1", b"a", b"2"], [(b"z", None)]),                      # odd: whole key
    ([b"ZINCRBY", b"z", b"2", b"m"], [(b"z", b"m")]),
    ([b"ZREM", b"z", b"a"], [(b"z", b"a")]),
])
def test_members_named_by_each_command(args: list[bytes], expected: list[tuple[bytes, bytes | None]]) -> None:
    assert _marks(args) == expected


def test_mark_frames_carry_members_in_c_as_in_the_reference() -> None:
    rng = random.Random(7)
    keys: list[bytes] = []
    for n in (0, 1, 9, 10, 255, 256, 1000, 70000):
        key = bytes(rng.randrange(256) for _ in range(n))
        keys += [key, MemberMark.of(key, bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 10, 300]))))]
    for db in (0, 9, 10**12):
        frame = _resp.mark_frame(db, keys)
        assert frame == encode_marks(db, keys)
        reader = libvalkey.Reader()
        reader.feed(frame)
        got = reader.gets()
        assert got[:2] == [b"MARK", b"%d" % db]
        assert got[2:] == [[bytes(k), k.member] if isinstance(k, MemberMark) else k for k in keys]
    plain = [b"a", b"bc"]
    assert _resp.mark_frame(0, plain) == libvalkey.pack_command((b"MARK", 0, *plain))    # unchanged
    bad = MemberMark(b"k")
    with pytest.raises(AttributeError):
        _resp.mark_frame(0, [bad])        # a MemberMark without its member is refused, as in Python
    bad.member = "text"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        _resp.mark_frame(0, [bad])


def test_member_marks_reach_a_syncer_in_another_process_as_member_marks() -> None:
    async def scenario() -> list[bytes]:
        got: list[bytes] = []
        server = MarkServer(lambda _db, keys: got.extend(keys), "tok")
        await server.start()
        remote = RemoteMarks("127.0.0.1", server.port, "tok")
        try:
            await remote(3, [b"k", MemberMark.of(b"z", b"m"), MemberMark.of(b"z", b"")])
        finally:
            await remote.close()
            await server.stop()
        return got

    got = asyncio.run(scenario())
    assert got == [b"k", b"z", b"z"]
    assert [type(k) for k in got] == [bytes, MemberMark, MemberMark]
    assert [k.member for k in got[1:]] == [b"m", b""]   # type: ignore[attr-defined]


def test_the_proxy_marks_members_on_its_fast_and_general_paths(source, make_proxy) -> None:
    runner = make_proxy(source.endpoint())
    c = runner_client(runner)
    c.zadd("lb", {"a": 1, "b": 2})
    with c.pipeline(transaction=False) as p:         # a run of plain commands: the fast path
        p.zincrby("lb", 3, "a").set("plain", "1").sadd("s", "x", "y").hincrby("h", "f", 1)
        p.execute()
    with c.pipeline(transaction=True) as p:           # MULTI/EXEC: marks at EXEC
        p.srem("s", "x").zpopmin("lb")
        p.execute()
    got = [(bytes(k), getattr(k, "member", None)) for _, k in runner.marks]
    assert got[:2] == [(b"lb", b"a"), (b"lb", b"b")]
    assert got[2:7] == [(b"lb", b"a"), (b"plain", None), (b"s", b"x"), (b"s", b"y"), (b"h", b"f")]
    assert got[7:] == [(b"s", b"x"), (b"lb", None)]
    assert runner_client(runner).zscore("lb", "a") == 4.0


def runner_client(runner: Any) -> valkey.Valkey:
    return valkey.Valkey(host="127.0.0.1", port=runner.port, socket_timeout=10)
