"""What a server is: standalone or cluster, its primaries, which primary owns which slot."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from valkey.crc import key_slot

from .errors import ServerError
from .resp import Connection, ReplyError, reply_text_map, text
from .urls import Endpoint

SLOTS = 16384


@dataclasses.dataclass
class Topology:
    seed: Endpoint
    cluster: bool
    primaries: list[Endpoint]
    version: tuple[int, ...]
    run_ids: set[str]
    # slot -> index into primaries (cluster mode only)
    slot_owner: list[int] = dataclasses.field(default_factory=list, repr=False)
    # standalone: db number -> key count (INFO keyspace)
    db_keys: dict[int, int] = dataclasses.field(default_factory=dict)
    # hash fields with their own expiry (HEXPIRE, HSETEX...: Valkey 9): the server knows HPEXPIRETIME
    field_ttl: bool = False
    # keys with such fields (INFO keyspace keys_with_volatile_items), summed over the dbs (standalone)
    volatile_item_keys: int = 0

    def primary_for(self, key: bytes) -> int:
        return self.slot_owner[key_slot(key)] if self.cluster else 0

    def describe(self) -> str:
        if self.cluster:
            return f"cluster of {len(self.primaries)} primaries (v{'.'.join(map(str, self.version))})"
        return f"standalone server (v{'.'.join(map(str, self.version))})"

    @property
    def supports_pexpiretime(self) -> bool:
        return self.version >= (7, 0)


def parse_info(text: bytes | str) -> dict[str, str]:
    if isinstance(text, bytes):
        text = text.decode()
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            k, v = line.split(":", 1)
            out[k] = v
    return out


def keyspace_counts(info: dict[str, str], field: str = "keys") -> dict[int, int]:
    """`db0:keys=3,expires=0,avg_ttl=0` -> {0: 3} (or another field of each db's line)."""
    counts = {}
    for k, v in info.items():
        if k.startswith("db") and k[2:].isdigit():
            fields = dict(f.split("=", 1) for f in v.split(",") if "=" in f)
            counts[int(k[2:])] = int(fields.get(field, 0))
    return counts


def _version(info: dict[str, str]) -> tuple[int, ...]:
    raw = info.get("valkey_version") or info.get("redis_version") or "0"
    return tuple(int(p) for p in raw.split(".") if p.isdigit())


async def discover(seed: Endpoint, name: str = "durablecache-engine") -> Topology:
    conn = await Connection.open(seed, name=name, select_db=0)
    try:
        info = parse_info(await conn.call("INFO", "server"))
        info.update(parse_info(await conn.call("INFO", "cluster")))
        info.update(parse_info(await conn.call("INFO", "keyspace")))
        version = _version(info)
        probe = (await conn.pipeline([("COMMAND", "INFO", "HPEXPIRETIME")]))[0]
        field_ttl = isinstance(probe, list) and bool(probe) and probe[0] is not None
        volatile_items = keyspace_counts(info, "keys_with_volatile_items")
        if info.get("cluster_enabled") != "1":
            return Topology(seed, False, [seed], version, {info.get("run_id", "")},
                            db_keys=keyspace_counts(info), field_ttl=field_ttl,
                            volatile_item_keys=sum(volatile_items.values()))
        primaries, owner = await _cluster_map(conn, seed)
    finally:
        await conn.close()
    run_ids = set()
    volatile_items_total = 0
    for node in primaries:
        c = await Connection.open(node, name=name, select_db=0)
        try:
            run_ids.add(parse_info(await c.call("INFO", "server")).get("run_id", ""))
            space = parse_info(await c.call("INFO", "keyspace"))
            volatile_items_total += sum(keyspace_counts(space, "keys_with_volatile_items").values())
        finally:
            await c.close()
    return Topology(seed, True, primaries, version, run_ids, owner, field_ttl=field_ttl,
                    volatile_item_keys=volatile_items_total)


async def _cluster_map(conn: Connection, seed: Endpoint) -> tuple[list[Endpoint], list[int]]:
    reply = (await conn.pipeline([["CLUSTER", "SHARDS"]]))[0]
    ranges: list[tuple[Endpoint, list[tuple[int, int]]]]
    if isinstance(reply, ReplyError):  # Redis < 7: CLUSTER SHARDS does not exist
        ranges = _from_slots(await conn.call("CLUSTER", "SLOTS"), seed)
    else:
        ranges = _from_shards(reply, seed)
    primaries: list[Endpoint] = []
    owner = [-1] * SLOTS
    for node, spans in ranges:
        if node not in primaries:
            primaries.append(node)
        idx = primaries.index(node)
        for lo, hi in spans:
            for slot in range(lo, hi + 1):
                owner[slot] = idx
    missing = owner.count(-1)
    if missing:
        raise ServerError(f"{seed.address}: cluster does not cover all slots ({missing} unassigned)")
    return primaries, owner


def _node_host(fields: dict[str, Any], seed: Endpoint) -> str:
    for key in ("hostname", "endpoint", "ip"):
        value = text(fields.get(key, b"") or b"")
        if value and value != "?":
            return value
    return seed.host


def _from_shards(reply: Iterable[Any], seed: Endpoint) -> list[tuple[Endpoint, list[tuple[int, int]]]]:
    out = []
    for shard in reply:
        fields = reply_text_map(shard)
        slots = [int(s) for s in fields.get("slots", [])]
        spans = [(slots[i], slots[i + 1]) for i in range(0, len(slots), 2)]
        for node in fields.get("nodes", []):
            nf = reply_text_map(node)
            if text(nf.get("role", b"")) != "master" or not spans:
                continue
            port = int(nf.get("tls-port") or 0) if seed.tls else int(nf.get("port") or 0)
            port = port or int(nf.get("port") or seed.port)
            out.append((seed.with_address(_node_host(nf, seed), port), spans))
    return out


def _from_slots(reply: Iterable[Any], seed: Endpoint) -> list[tuple[Endpoint, list[tuple[int, int]]]]:
    out = []
    for entry in reply:
        lo, hi, primary = int(entry[0]), int(entry[1]), entry[2]
        host = text(primary[0]) or seed.host
        out.append((seed.with_address(host, int(primary[1])), [(lo, hi)]))
    return out
