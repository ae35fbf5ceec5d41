"""FREEZE and the key hold wait only for the sessions in ``ProxyState.writing``, not for every connected
one (what keeps the pause from growing with idle clients). That is lossless only if every session with
a write in flight is in that set at every moment: checked here on every turn of the proxy's event loop
while writes of each kind the proxy counts (pipelined fast path, plain, MULTI/EXEC, script, blocking,
a client leaving with writes in flight) go through it, with a slow syncer keeping marks in delivery."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket

import pytest
import valkey

from durablecache.testing.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def writes_of_every_kind(port: int, rounds: int) -> None:
    c = valkey.Valkey(host="127.0.0.1", port=port, socket_timeout=10)
    script = c.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
    for i in range(rounds):
        pipe = c.pipeline(transaction=False)
        for j in range(20):
            pipe.set(f"fast:{j}", i)
        pipe.execute()
        c.incr("plain")
        tx = c.pipeline(transaction=True)
        tx.set("tx:a", i).incr("tx:b")
        tx.execute()
        script(keys=["script"], args=[i])
        c.rpush("queue", i)
        c.blmove("queue", "moved", 1.0)
    c.close()


def leave_with_a_write_in_flight(port: int) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(b"*3\r\n$3\r\nSET\r\n$4\r\nleft\r\n$1\r\n1\r\n")
    raw.close()


def test_every_session_with_writes_in_flight_is_among_the_writers(source, make_proxy):
    p = make_proxy(source.endpoint())
    p.mark_delay = 0.002                  # a slow syncer: batches of marks stay in delivery for a while
    proxy = p.proxy
    missing: list[str] = []
    seen_writing = [0]
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            for s in [*proxy.sessions.values(), *proxy.departed]:
                if s.inflight or s.marking:
                    seen_writing[0] += 1
                    if s not in proxy.writing:
                        missing.append(f"session {s.id}: inflight={s.inflight} marking={s.marking}")
            await asyncio.sleep(0)        # once per turn of the loop

    watcher = p.submit(watch())
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(writes_of_every_kind, p.port, 30) for _ in range(3)]
        jobs += [pool.submit(leave_with_a_write_in_flight, p.port) for _ in range(5)]
        for job in jobs:
            job.result(60)
    wait_for("the departed clients' writes settled", lambda: not p.call(lambda: len(proxy.departed)), 10)
    p.loop.call_soon_threadsafe(done.set)
    watcher.result(10)
    assert seen_writing[0] > 100, "the watch saw too few sessions with writes in flight to prove anything"
    assert not missing, missing[:5]
    assert p.call(lambda: proxy.stats()["inflight_writes"]) == 0
    assert p.call(lambda: len(proxy.writing)) == 0        # settled sessions leave the set
    assert source.client().get("left") == b"1" and (0, b"left") in p.marks
