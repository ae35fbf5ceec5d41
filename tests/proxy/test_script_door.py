"""No writes the proxy cannot see through scripts: during a migration a script (EVAL, SCRIPT LOAD,
FUNCTION LOAD, EVALSHA, FCALL) whose commands cannot be checked statically, or that calls a command
refused during a migration (FLUSHDB, SWAPDB, SELECT …), is refused; outside a migration nothing changes."""

from __future__ import annotations

import pytest
import valkey

from durablecache.proxy.scripts import check_library, check_script

pytestmark = pytest.mark.timeout(120)

FLUSH = "return redis.call('flushdb')"
SWAP = "return redis.call('swapdb', 0, 3)"
SELECT = "redis.call('select', 5) return redis.call('set', KEYS[1], 'x')"
ALIAS = "local c = redis.call return c('flushdb')"
INDEXED = "return redis['call']('flushdb')"
DYNAMIC = "return redis.call(ARGV[1])"
SERVER = "return server.call('FLUSHALL')"
PLAIN = "return redis.call('set', KEYS[1], ARGV[1])"
BYPASSES = [FLUSH, SWAP, SELECT, ALIAS, INDEXED, DYNAMIC, SERVER]


# ---- the checker --------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    FLUSH, SWAP, SELECT, ALIAS, INDEXED, DYNAMIC, SERVER,
    "return redis.pcall('FLUSHALL')",
    "return redis . call  (  'move', KEYS[1], 3)",
    "return redis.call [[flushdb]]",                             # a call without parentheses
    "return redis.call([==[flushdb]==])",
    "return redis.call('flush' .. 'db')",
    "return redis.call(('flushdb'))",
    "return redis.call('\\102lushdb')",                          # an escape spelling flushdb
    "return pcall(redis.call, 'flushdb')",
    "local r = redis return r.call('flushdb')",
    "return _G['redis'].call('flushdb')",
    "return getfenv(1).redis.call('flushdb')",
    "return loadstring(ARGV[1])()",
    "return load(ARGV[1])()",
    "return rawget(_G, 'redis')",
    "return redis.call('copy', KEYS[1], KEYS[2], 'DB', 3)",
    "return redis.call('copy', KEYS[1], KEYS[2], unpack(ARGV))",
    "return redis.call('COPY', unpack(KEYS))",
    "return redis.call('get', KEYS[1]",                          # unbalanced
    "return 'unterminated",
    "--[[ unterminated comment",
])
def test_checker_refuses(body):
    assert check_script(body.encode()) is not None


@pytest.mark.parametrize("body", [
    PLAIN,
    "return redis.call ( \"GET\" , KEYS[1] )",
    "-- redis.call('flushdb') in a comment\nreturn redis.call('get', KEYS[1])",
    "--[==[ redis.call('flushdb')\n ]] still a comment ]==] return redis.pcall('incr', KEYS[1])",
    "return 'flushdb is only data here'",
    "local s = \"redis.call('flushdb')\" return redis.call('set', KEYS[1], s)",
    "return [[ redis.call('swapdb', 0, 1) ]]",
    "return redis.call('copy', KEYS[1], KEYS[2])",
    "return redis.call('copy', KEYS[1], KEYS[2], 'replace')",
    "redis.log(redis.LOG_WARNING, 'x') return redis.sha1hex(ARGV[1])",
    "return select('#', 1, 2)",                                  # Lua's select, not the command
    "#!lua flags=no-writes\nreturn redis.call('get', KEYS[1])",
])
def test_checker_accepts(body):
    assert check_script(body.encode()) is None


def test_checker_libraries():
    lib = (b"#!lua name=good\n"
           b"redis.register_function('setit', function(keys, args) return redis.call('set', keys[1], args[1]) end)\n"
           b"redis.register_function{function_name='getit', callback=function(keys) "
           b"return redis.call('get', keys[1]) end, flags={'no-writes'}}\n")
    assert check_library(lib) == (None, [b"setit", b"getit"])
    bad = b"#!lua name=bad\nredis.register_function('f', function() return redis.call('flushall') end)"
    reason, _ = check_library(bad)
    assert reason is not None and "FLUSHALL" in reason


# ---- through the proxy --------------------------------------------------------------------------

def _refused(exc: pytest.ExceptionInfo[BaseException]) -> None:
    assert "durablecache: this script is refused during a migration" in str(exc.value)
    assert "docs/proxy.md" in str(exc.value)


def test_script_bypasses_refused_during_a_migration(source, make_proxy):
    p = make_proxy(source.endpoint())
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    d = source.client()
    d.set("k", "1")
    for body in BYPASSES:
        with pytest.raises(valkey.ResponseError) as exc:
            c.eval(body, 1, "k", "flushdb")
        _refused(exc)
        with pytest.raises(valkey.ResponseError) as exc:
            c.script_load(body)
        _refused(exc)
    assert d.get("k") == b"1"
    assert source.client(db=5).get("k") is None
    assert source.client(db=3).dbsize() == 0
    lib = "#!lua name=evil\nredis.register_function('wipe', function() return redis.call('flushdb') end)"
    with pytest.raises(valkey.ResponseError) as exc:
        c.function_load(lib)
    _refused(exc)
    assert d.function_list() == []
    # EVAL_RO cannot write: not checked (the server refuses writes in it).
    with pytest.raises(valkey.ResponseError) as ro:
        c.eval_ro(FLUSH, 0)
    assert "durablecache" not in str(ro.value)
    assert d.get("k") == b"1"
    # Inside MULTI the refusal fails the transaction, as a command the server rejects while queuing.
    tx = c.pipeline(transaction=True)
    tx.set("k", "2").eval(FLUSH, 0)
    with pytest.raises(valkey.ResponseError, match="EXECABORT|durablecache"):
        tx.execute()
    assert d.get("k") == b"1"


def test_script_bypasses_allowed_outside_a_migration(source, make_proxy):
    p = make_proxy(source.endpoint(), migrating=False)
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    d = source.client()
    d.set("k", "1")
    c.eval(SELECT, 1, "k")
    assert source.client(db=5).get("k") == b"x"
    c.eval(SWAP, 0)
    assert source.client(db=3).get("k") == b"1"
    c.eval(SWAP, 0)
    assert c.eval(ALIAS, 0) in (b"OK", True)
    assert d.dbsize() == 0
    sha = c.script_load(FLUSH)
    d.set("k", "1")
    c.evalsha(sha, 0)
    assert d.dbsize() == 0
    c.function_load("#!lua name=wiper\nredis.register_function('wipe', function() return redis.call('flushdb') end)")
    d.set("k", "1")
    c.fcall("wipe", 0)
    assert d.dbsize() == 0
    # An EVALSHA the proxy never saw goes through (no NOSCRIPT from the proxy).
    other = d.script_load("return 7")
    assert c.evalsha(other, 0) == 7


def test_checked_script_works_and_marks_its_keys(source, make_proxy):
    p = make_proxy(source.endpoint())
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    assert c.eval(PLAIN, 1, "s1", "v") in (b"OK", True)
    assert source.client().get("s1") == b"v"
    assert b"s1" in p.keys(0)
    assert c.eval(PLAIN, 1, "s0", "u") in (b"OK", True)     # known now: not checked again
    assert b"s0" in p.keys(0)
    # Its SHA1 is known now: EVALSHA goes through, and marks.
    sha = source.client().script_load(PLAIN)
    assert c.evalsha(sha, 1, "s2", "w") in (b"OK", True)
    assert source.client().get("s2") == b"w"
    assert b"s2" in p.keys(0)


def test_evalsha_of_an_unseen_script_gets_noscript_and_register_script_recovers(source, make_proxy):
    body = "return redis.call('incrby', KEYS[1], ARGV[1])"
    direct = source.client()
    sha = direct.script_load(body)            # loaded before (or beside) the proxy: never checked
    p = make_proxy(source.endpoint())
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    with pytest.raises(valkey.exceptions.NoScriptError):
        c.evalsha(sha, 1, "n", 1)
    assert direct.get("n") is None
    assert c.script_exists(sha) == [False]    # "does not exist" until the proxy checked it
    script = c.register_script(body)
    assert script(keys=["n"], args=[2]) == 2  # NOSCRIPT -> SCRIPT LOAD (checked) -> EVALSHA
    assert script(keys=["n"], args=[3]) == 5
    assert b"n" in p.keys(0)
    assert c.script_exists(sha) == [True]
    # In a pipeline (valkey-py checks SCRIPT EXISTS, loads what is missing, then EVALSHAs).
    other = c.register_script("return redis.call('incrby', KEYS[1], 10)")
    pipe = c.pipeline(transaction=True)
    other(keys=["m"], client=pipe)
    other(keys=["m"], client=pipe)
    assert pipe.execute() == [10, 20]
    # A refused body cannot be smuggled in that way either.
    evil = c.register_script(FLUSH)
    with pytest.raises(valkey.ResponseError, match="durablecache"):
        evil()
    assert direct.get("n") == b"5"


def test_fcall_only_of_checked_libraries(source, make_proxy):
    direct = source.client()
    direct.function_load("#!lua name=before\n"
                         "redis.register_function('bump', function(keys) return redis.call('incr', keys[1]) end)")
    direct.function_load("#!lua name=evilbefore\n"
                         "redis.register_function('wipe', function() return redis.call('flushdb') end)")
    p = make_proxy(source.endpoint())
    direct.function_load("#!lua name=after\n"
                         "redis.register_function('sneak', function(keys) return redis.call('incr', keys[1]) end)")
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    assert c.fcall("bump", 1, "f1") == 1              # its library was checked when the proxy started
    assert b"f1" in p.keys(0)
    direct.set("keep", "1")
    with pytest.raises(valkey.ResponseError) as exc:
        c.fcall("wipe", 0)
    _refused(exc)
    with pytest.raises(valkey.ResponseError) as exc:   # loaded behind the proxy's back: not checked
        c.fcall("sneak", 1, "f2")
    _refused(exc)
    assert direct.get("keep") == b"1" and direct.get("f2") is None
    with pytest.raises(valkey.ResponseError) as ro:   # FCALL_RO is not checked: the server refuses a
        c.fcall_ro("sneak", 1, "f2")                  # function without the no-writes flag itself
    assert "durablecache" not in str(ro.value)
    c.function_load("#!lua name=through\nredis.register_function('put', "
                    "function(keys, args) return redis.call('set', keys[1], args[1]) end)")
    assert c.fcall("put", 1, "f3", "v") in (b"OK", True)
    assert direct.get("f3") == b"v" and b"f3" in p.keys(0)
    with pytest.raises(valkey.ResponseError) as exc:
        c.execute_command("FUNCTION", "RESTORE", direct.function_dump())
    _refused(exc)


def test_glide_script_through_a_migrating_proxy(source, make_proxy):
    """GLIDE's invoke_script sends EVALSHA, and the body when it gets NOSCRIPT."""
    glide = pytest.importorskip("glide", reason="pip install valkey-glide")
    import asyncio
    body = "return redis.call('incrby', KEYS[1], ARGV[1])"
    source.client().script_load(body)        # the server has it; the proxy has not checked it
    p = make_proxy(source.endpoint())

    async def main() -> None:
        cfg = glide.GlideClientConfiguration([glide.NodeAddress("127.0.0.1", p.port)], request_timeout=5000)
        client = await glide.GlideClient.create(cfg)
        assert await client.invoke_script(glide.Script(body), keys=["gs"], args=["4"]) == 4
        assert await client.invoke_script(glide.Script(body), keys=["gs"], args=["1"]) == 5
        with pytest.raises(glide.RequestError, match="durablecache"):
            await client.invoke_script(glide.Script(FLUSH))
        await client.close()
    asyncio.run(asyncio.wait_for(main(), 60))
    assert source.client().get("gs") == b"5"
    assert b"gs" in p.keys(0)
