"""WATCH / MULTI / EXEC through the proxy behave as against a server: in standalone and cluster mode,
RESP2 and RESP3. Queued commands are queued by the server (+QUEUED) and applied at EXEC only; a
conflicting write aborts EXEC; the proxy's own answers (CLIENT GETNAME …) inside MULTI are +QUEUED and
in their place in EXEC's array."""

from __future__ import annotations

import random

import libvalkey
import pytest
import valkey
from rawclient import Raw, refused

pytestmark = pytest.mark.timeout(180)

KEYS = ["{t}a", "{t}b", "{t}c"]     # one slot: a transaction on them is valid in cluster mode too


@pytest.fixture(params=["standalone", "cluster"])
def upstream(request, make_server, make_cluster, make_proxy):
    """(proxy runner, a direct client to the node holding KEYS)."""
    if request.param == "standalone":
        server = make_server()
        return make_proxy(server.endpoint()), server.client()
    cluster = make_cluster(primaries=3)
    p = make_proxy(cluster.endpoint())
    direct = cluster.cluster_client()
    node = direct.get_node_from_key(KEYS[0])
    return p, valkey.Valkey(host=node.host, port=node.port, socket_timeout=10)


def _null(reply: object) -> bool:
    return reply is None


@pytest.mark.parametrize("protocol", [2, 3])
def test_watch_multi_exec_applies_at_exec_only(upstream, protocol):
    p, direct = upstream
    direct.set("{t}bar", "a")
    c = Raw(p.port, protocol)
    assert c("WATCH", "{t}bar") == b"OK"
    assert c("MULTI") == b"OK"
    assert c("SET", "{t}bar", "b") == b"QUEUED"
    assert c("INCR", "{t}n") == b"QUEUED"
    assert c("PING") == b"QUEUED"                  # keyless: queued on the transaction's node too
    assert direct.get("{t}bar") == b"a"           # nothing applied yet
    assert direct.get("{t}n") is None
    assert c("EXEC") == [b"OK", 1, b"PONG"]
    assert direct.get("{t}bar") == b"b" and direct.get("{t}n") == b"1"
    assert {b"{t}bar", b"{t}n"} <= p.keys(0)
    # Without WATCH, too.
    assert c("MULTI") == b"OK"
    assert c("SET", "{t}bar", "c") == b"QUEUED"
    assert direct.get("{t}bar") == b"b"
    assert c("EXEC") == [b"OK"]
    assert direct.get("{t}bar") == b"c"
    # DISCARD: nothing applied, the watch is gone.
    assert c("WATCH", "{t}bar") == b"OK"
    assert c("MULTI") == b"OK"
    assert c("SET", "{t}bar", "d") == b"QUEUED"
    assert c("DISCARD") == b"OK"
    assert direct.get("{t}bar") == b"c"
    assert refused(c("EXEC"), "ERR EXEC without MULTI")
    c.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_conflicting_write_aborts_exec(upstream, protocol):
    p, direct = upstream
    direct.set("{t}x", "1")
    c = Raw(p.port, protocol)
    assert c("WATCH", "{t}x") == b"OK"
    direct.set("{t}x", "2")                        # another connection touches the watched key
    assert c("MULTI") == b"OK"
    assert c("SET", "{t}x", "3") == b"QUEUED"
    assert _null(c("EXEC"))
    assert direct.get("{t}x") == b"2"
    # Touched after MULTI: aborted as well.
    assert c("WATCH", "{t}x") == b"OK"
    assert c("MULTI") == b"OK"
    assert c("SET", "{t}x", "4") == b"QUEUED"
    direct.set("{t}x", "5")
    assert _null(c("EXEC"))
    assert direct.get("{t}x") == b"5"
    # Untouched: applied.
    assert c("WATCH", "{t}x") == b"OK"
    assert c("MULTI") == b"OK"
    assert c("SET", "{t}x", "6") == b"QUEUED"
    assert c("EXEC") == [b"OK"]
    assert direct.get("{t}x") == b"6"
    c.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_local_answers_inside_multi_are_queued_and_spliced(upstream, protocol):
    p, direct = upstream
    c = Raw(p.port, protocol)
    assert c("CLIENT", "SETNAME", "before") == b"OK"
    assert c("MULTI") == b"OK"
    assert c("CLIENT", "GETNAME") == b"QUEUED"
    assert c("SET", "{t}k", "v") == b"QUEUED"
    assert c("CLIENT", "SETNAME", "inside") == b"QUEUED"
    assert c("CLIENT", "GETNAME") == b"QUEUED"
    assert c("GET", "{t}k") == b"QUEUED"
    assert c("CLIENT", "GETNAME") == b"QUEUED"
    assert c("CLIENT", "GETNAME") == b"QUEUED"
    assert c("EXEC") == [b"before", b"OK", b"OK", b"inside", b"v", b"inside", b"inside"]
    assert c("CLIENT", "GETNAME") == b"inside"
    # Only local answers: the array is the proxy's.
    assert c("MULTI") == b"OK"
    assert c("CLIENT", "GETNAME") == b"QUEUED"
    assert c("EXEC") == [b"inside"]
    # Aborted: no local answer takes effect either.
    assert c("WATCH", "{t}k") == b"OK"
    assert c("MULTI") == b"OK"
    assert c("CLIENT", "SETNAME", "never") == b"QUEUED"
    assert c("SET", "{t}k", "w") == b"QUEUED"
    direct.set("{t}k", "other")
    assert _null(c("EXEC"))
    assert c("CLIENT", "GETNAME") == b"inside"
    assert direct.get("{t}k") == b"other"
    c.close()


def test_valkey_py_watch_pipeline(upstream):
    """valkey-py's optimistic-locking pattern (WATCH, read, MULTI, write, EXEC) through the proxy."""
    p, direct = upstream
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    direct.set("{t}counter", "10")
    with c.pipeline() as pipe:
        pipe.watch("{t}counter")
        value = int(pipe.get("{t}counter"))
        pipe.multi()
        pipe.set("{t}counter", value + 1)
        assert pipe.execute() == [True]
    assert direct.get("{t}counter") == b"11"
    with c.pipeline() as pipe:
        pipe.watch("{t}counter")
        value = int(pipe.get("{t}counter"))
        direct.set("{t}counter", "100")
        pipe.multi()
        pipe.set("{t}counter", value + 1)
        with pytest.raises(valkey.WatchError):
            pipe.execute()
    assert direct.get("{t}counter") == b"100"


def test_cluster_watch_of_keys_on_different_slots(make_cluster, make_proxy):
    cluster = make_cluster(primaries=3)
    p = make_proxy(cluster.endpoint())
    c = Raw(p.port)
    assert refused(c("WATCH", "a", "b"), "CROSSSLOT")             # one WATCH: one slot, as a server
    # Two WATCHes on different nodes: the second would bind the transaction to another node.
    direct = cluster.cluster_client()
    far = next(k for k in (f"k{i}" for i in range(1000))
               if direct.get_node_from_key(k).port != direct.get_node_from_key("{t}a").port)
    assert c("WATCH", "{t}a") == b"OK"
    assert refused(c("WATCH", far), "CROSSSLOT")
    assert c("MULTI") == b"OK"
    assert refused(c("SET", far, "1"), "CROSSSLOT")                # spans nodes: as before
    assert refused(c("EXEC"), "EXECABORT")
    assert direct.get(far) is None
    c.close()


# ---- the same random steps through the proxy and directly: the same outcomes ----------------------

def _steps(seed: int, n: int = 200) -> list[tuple[str, tuple[str, ...]]]:
    """(who, command): "a" is the transaction's connection, "b" another one writing meanwhile."""
    rng = random.Random(seed)
    steps: list[tuple[str, tuple[str, ...]]] = []
    in_multi = False
    for _ in range(n):
        key = rng.choice(KEYS)
        r = rng.random()
        if r < 0.2:
            steps.append(("b", rng.choice([("SET", key, str(rng.randint(0, 9))), ("INCR", key)])))
        elif not in_multi:
            choice = rng.choice(["watch", "watch", "multi", "multi", "set", "incr", "unwatch", "exec"])
            if choice == "watch":
                steps.append(("a", ("WATCH", *rng.sample(KEYS, rng.randint(1, 2)))))
            elif choice == "multi":
                steps.append(("a", ("MULTI",)))
                in_multi = True
            elif choice == "set":
                steps.append(("a", ("SET", key, str(rng.randint(0, 9)))))
            elif choice == "incr":
                steps.append(("a", ("INCR", key)))
            elif choice == "unwatch":
                steps.append(("a", ("UNWATCH",)))
            else:
                steps.append(("a", ("EXEC",)))            # EXEC without MULTI: an error, both ways
        else:
            choice = rng.choice(["set", "set", "incr", "incr", "get", "getname", "exec", "exec", "discard"])
            if choice == "set":
                steps.append(("a", ("SET", key, str(rng.randint(0, 9)))))
            elif choice == "incr":
                steps.append(("a", ("INCR", key)))
            elif choice == "get":
                steps.append(("a", ("GET", key)))
            elif choice == "getname":
                steps.append(("a", ("CLIENT", "GETNAME")))
            else:
                steps.append(("a", ("EXEC",) if choice == "exec" else ("DISCARD",)))
                in_multi = False
    if in_multi:
        steps.append(("a", ("EXEC",)))
    return steps


def _run(steps: list[tuple[str, tuple[str, ...]]], a: Raw, b: valkey.Valkey) -> list[object]:
    out: list[object] = []
    for who, cmd in steps:
        if who == "b":
            b.execute_command(*cmd)
        else:
            reply = a(*cmd)
            out.append(str(reply) if isinstance(reply, libvalkey.ReplyError) else reply)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("protocol", [2, 3])
def test_random_interleavings_match_a_server(upstream, make_server, seed, protocol):
    p, direct = upstream
    reference = make_server()
    steps = _steps(seed * 10 + protocol)
    for client in (direct, reference.client()):
        client.mset({k: "0" for k in KEYS})
    through = Raw(p.port, protocol)
    through("CLIENT", "SETNAME", "a")
    plain = Raw(reference.port, protocol)
    plain("CLIENT", "SETNAME", "a")
    got = _run(steps, through, direct)
    want = _run(steps, plain, reference.client())
    assert got == want
    assert [direct.get(k) for k in KEYS] == [reference.client().get(k) for k in KEYS]
    # The outcomes were not all of one kind.
    execs = [r for (who, cmd), r in zip([s for s in steps if s[0] == "a"], want) if cmd == ("EXEC",)]
    assert any(r is None for r in execs) and any(isinstance(r, list) for r in execs)


def test_glide_watch_transaction_in_cluster_mode(make_cluster, make_proxy):
    """The reported case: GLIDE against a cluster through the proxy, WATCH + atomic batch."""
    glide = pytest.importorskip("glide", reason="pip install valkey-glide")
    import asyncio
    cluster = make_cluster(primaries=3)
    p = make_proxy(cluster.endpoint())
    direct = cluster.cluster_client()
    direct.set("bar", "a")

    async def main() -> None:
        cfg = glide.GlideClusterClientConfiguration([glide.NodeAddress("127.0.0.1", p.port)],
                                                    request_timeout=5000)
        client = await glide.GlideClusterClient.create(cfg)
        assert await client.watch(["bar"]) == "OK"
        batch = glide.ClusterBatch(is_atomic=True)
        batch.set("bar", "b")
        batch.get("bar")
        assert await client.exec(batch, raise_on_error=True) == ["OK", b"b"]
        assert direct.get("bar") == b"b"
        assert await client.watch(["bar"]) == "OK"
        direct.set("bar", "other")
        batch = glide.ClusterBatch(is_atomic=True)
        batch.set("bar", "c")
        assert await client.exec(batch, raise_on_error=True) is None
        assert direct.get("bar") == b"other"
        await client.close()
    asyncio.run(asyncio.wait_for(main(), 60))
