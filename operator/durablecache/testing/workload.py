"""A write load that keeps a ledger of every acknowledged write: the demo's and the zero-loss
tests' application stand-in. Each writer owns its keys, so the expected final state is exact;
a write whose reply was lost (connection dropped) is 'uncertain' — it may or may not have applied."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

import valkey
import valkey.asyncio as avalkey

from .waiting import wait_for_async

CONNECTION_ERRORS = (valkey.ConnectionError, valkey.TimeoutError, OSError, asyncio.TimeoutError)


@dataclasses.dataclass
class Ledger:
    strings: dict[str, str] = dataclasses.field(default_factory=dict)
    deleted: set[str] = dataclasses.field(default_factory=set)
    expiring: set[str] = dataclasses.field(default_factory=set)
    counter: tuple[int, int] = (0, 0)  # (acknowledged, uncertain)
    items: list[str] = dataclasses.field(default_factory=list)  # acknowledged RPUSH values, in order
    uncertain_items: set[str] = dataclasses.field(default_factory=set)
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    acked: int = 0
    uncertain: int = 0
    refused: int = 0
    max_latency: float = 0.0


class Workload:
    def __init__(self, host: str, port: int, *, writers: int = 4, rate: float = 500.0, cluster: bool = False,
                 password: str | None = None, prefix: str = "load", username: str | None = None):
        self.address = (host, port)
        self.writers = writers
        self.rate = rate
        self.cluster = cluster
        self.password = password
        self.username = username
        self.prefix = prefix
        self.ledgers = [Ledger() for _ in range(writers)]
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def acked(self) -> int:
        return sum(x.acked for x in self.ledgers)

    @property
    def max_latency_ms(self) -> float:
        return max(x.max_latency for x in self.ledgers) * 1000

    def point_at(self, host: str, port: int) -> None:
        """The applications' endpoint changed (RouteIn): writers reconnect to it."""
        self.address = (host, port)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._writer(i)) for i in range(self.writers)]

    async def writes_go_on(self, more: int, timeout: float) -> None:
        """Until ``more`` writes beyond those acknowledged so far are acknowledged: the positive sign
        that the load goes on (after a cutover, through a restarted proxy) before a check that needs it."""
        goal = self.acked + more
        await wait_for_async(f"{more} more acknowledged writes", lambda: self.acked >= goal, timeout)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self._tasks)

    def _client(self) -> Any:
        host, port = self.address
        opts: dict[str, Any] = {"host": host, "port": port, "username": self.username, "password": self.password,
                                "socket_timeout": 10,
                                "socket_connect_timeout": 5}
        if self.cluster:
            return avalkey.ValkeyCluster(**opts)
        return avalkey.Valkey(**opts)

    async def _writer(self, w: int) -> None:
        led = self.ledgers[w]
        p = f"{self.prefix}:{w}"
        interval = 1.0 / self.rate if self.rate else 0.0
        client, connected_to = None, None
        n = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            if client is None or connected_to != self.address:
                if client is not None:
                    await _close(client)
                connected_to, client = self.address, self._client()
            n += 1
            op = n % 6
            s_key = f"{p}:s:{n - n % 6}"
            t0 = time.monotonic()
            sent = True
            try:
                if op == 0:
                    await client.set(s_key, f"v{n}")
                    led.strings[s_key] = f"v{n}"
                elif op == 1:
                    await client.incr(f"{p}:counter")
                    led.counter = (led.counter[0] + 1, led.counter[1])
                elif op == 2:
                    await client.rpush(f"{p}:list", f"i{n}")
                    led.items.append(f"i{n}")
                elif op == 3:
                    await client.hset(f"{p}:hash", f"f{n % 50}", f"v{n}")
                    led.fields[f"f{n % 50}"] = f"v{n}"
                elif op == 4 and s_key in led.strings:
                    await client.expire(s_key, 3600)
                    led.expiring.add(s_key)
                elif op == 5 and (n // 6) % 3 == 0 and s_key in led.strings:
                    await client.delete(s_key)
                    led.strings.pop(s_key, None)
                    led.expiring.discard(s_key)
                    led.deleted.add(s_key)
                else:
                    sent = False
                led.acked += sent
                led.max_latency = max(led.max_latency, time.monotonic() - t0)
            except valkey.ResponseError:
                led.refused += 1
            except CONNECTION_ERRORS:
                # The reply is lost: the write may or may not have been applied.
                led.uncertain += 1
                if op == 0:
                    led.strings.pop(s_key, None)
                elif op == 1:
                    led.counter = (led.counter[0], led.counter[1] + 1)
                elif op == 2:
                    led.uncertain_items.add(f"i{n}")
                elif op == 3:
                    led.fields.pop(f"f{n % 50}", None)
                elif op in (4, 5):
                    led.strings.pop(s_key, None)
                    led.expiring.discard(s_key)
                await _close(client)
                client = None
                await asyncio.sleep(0.05)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = time.monotonic()
        if client is not None:
            await _close(client)

    def lost(self, client: Any) -> list[str]:
        """Every acknowledged write that the given (synchronous) client does not see."""
        problems: list[str] = []
        for w, led in enumerate(self.ledgers):
            p = f"{self.prefix}:{w}"
            for key, value in led.strings.items():
                got = client.get(key)
                if got != value.encode():
                    problems.append(f"{key}: expected {value!r}, found {got!r}")
            for key in led.deleted:
                if key not in led.strings and client.exists(key):
                    problems.append(f"{key}: deleted but present")
            for key in led.expiring:
                if client.ttl(key) <= 0:
                    problems.append(f"{key}: expiry lost")
            got_counter = int(client.get(f"{p}:counter") or 0)
            acked, unsure = led.counter
            if not acked <= got_counter <= acked + unsure:
                problems.append(f"{p}:counter: {got_counter}, expected {acked}..{acked + unsure}")
            items = [x.decode() for x in client.lrange(f"{p}:list", 0, -1)]
            if [x for x in items if x not in led.uncertain_items] != led.items:
                problems.append(f"{p}:list: {len(items)} items, expected the {len(led.items)} acknowledged in order")
            stored = {k.decode(): v.decode() for k, v in client.hgetall(f"{p}:hash").items()}
            for field, value in led.fields.items():
                if stored.get(field) != value:
                    problems.append(f"{p}:hash {field}: expected {value}, found {stored.get(field)}")
        return problems


async def _close(client: Any) -> None:
    # Closing a broken connection can fail in many ways; there is nothing left to do about any.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.aclose(), 2.0)


def seed(client: Any, keys: int, prefix: str = "seed") -> None:
    """Sample data of every common type, 30% with TTLs (synchronous client, pipelined)."""
    pipe = client.pipeline(transaction=False)
    for i in range(keys):
        key = f"{prefix}:{i}"
        kind = i % 10
        if kind < 5:
            pipe.set(key, f"value-{i}-" + "x" * (i % 64))
        elif kind < 8:
            pipe.hset(key, mapping={"name": f"user{i}", "visits": i % 97, "plan": "pro" if i % 3 else "free"})
        elif kind == 8:
            pipe.rpush(key, *[f"event-{j}" for j in range(i % 16 + 1)])
        else:
            pipe.zadd(key, {f"player-{j}": (i * j) % 1000 for j in range(i % 12 + 1)})
        if i % 10 < 3:
            pipe.expire(key, 3600 + i % 600)
        if len(pipe) >= 2000:
            pipe.execute()
    pipe.execute()
