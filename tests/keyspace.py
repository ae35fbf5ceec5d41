"""Test data: a keyspace with every type, binary keys, expiries, and a stream with consumer groups."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

CLI = [sys.executable, "-m", "durablecache.cli"]


def populate(client: Any, n: int = 200, prefix: str = "") -> None:
    """Works with Valkey and ValkeyCluster clients (no multi-key commands)."""
    p = client.pipeline(transaction=False)
    for i in range(n):
        k = f"{prefix}{i}"
        p.set(f"str:{k}", f"value-{i}" * (i % 7 + 1))
        p.hset(f"hash:{k}", mapping={f"f{j}": f"v{j}" for j in range(i % 5 + 1)})
        p.rpush(f"list:{k}", *[f"e{j}" for j in range(i % 9 + 1)])
        p.sadd(f"set:{k}", *[f"m{j}" for j in range(i % 6 + 1)])
        p.zadd(f"zset:{k}", {f"m{j}": j * 1.5 - 3 for j in range(i % 8 + 1)})
        if i % 3 == 0:
            p.pexpire(f"str:{k}", 3_600_000 + i)
            p.pexpire(f"hash:{k}", 7_200_000)
    p.set(f"{prefix}empty-string", "")
    p.set(f"{prefix}bin:\x00\xff\r\n", b"\x00\x01\xfe\xff\r\n")
    p.set(f"{prefix}int", 12345)
    p.zadd(f"{prefix}zset:inf", {"lo": float("-inf"), "hi": float("inf"), "pi": 3.141592653589793})
    p.execute()
    stream = f"{prefix}stream:orders"
    for i in range(30):
        client.xadd(stream, {"order": i, "sku": f"sku-{i % 4}"})
    client.xgroup_create(stream, "billing", id="0")
    client.xreadgroup("billing", "alice", {stream: ">"}, count=10)
    client.xgroup_create(stream, "audit", id="$")


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it; ``env`` adds to (not replaces) this process's environment."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)


def dump_all(client: Any, db_count: int = 1) -> dict[Any, Any]:
    """A comparable snapshot of a standalone server: key -> (type, value, has_ttl)."""
    out = {}
    for key in client.scan_iter(count=500):
        t = client.type(key).decode()
        value: Any
        if t == "string":
            value = client.get(key)
        elif t == "hash":
            value = client.hgetall(key)
        elif t == "list":
            value = client.lrange(key, 0, -1)
        elif t == "set":
            value = sorted(client.smembers(key))
        elif t == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        else:
            value = client.xrange(key)
        out[key] = (t, value, client.pttl(key) > 0)
    return out
