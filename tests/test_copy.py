"""The bulk copier on real servers: every type, exact expiry, topologies, big keys, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from durablecache.testing.waiting import wait_for
from keyspace import CLI, dump_all, populate, run_cli


def summary(stdout: str) -> dict:
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert lines and lines[-1]["event"] == "summary", stdout
    return lines[-1]


def assert_equal(source_url: str, target_url: str) -> None:
    res = run_cli("verify", "--source", source_url, "--target", target_url, "--json")
    report = json.loads(res.stdout.splitlines()[-1])
    assert res.returncode == 0 and report["equal"], report


def test_every_type_and_db_copied_exactly(source, target):
    populate(source.client())
    populate(source.client(db=5), n=20, prefix="db5-")
    res = run_cli("copy", "--source", source.url(), "--target", target.url(), "--json")
    assert res.returncode == 0, res.stderr
    s = summary(res.stdout)
    expected = source.client().dbsize() + source.client(db=5).dbsize()
    assert s["keys"] == expected and s["skipped"] == 0 and s["big"] == 0
    assert dump_all(target.client()) == dump_all(source.client())
    assert dump_all(target.client(db=5)) == dump_all(source.client(db=5))
    # Streams keep their consumer groups, pending entries and last id.
    groups = {g["name"]: g for g in target.client().xinfo_groups("stream:orders")}
    assert groups[b"billing"]["pending"] == 10 and groups[b"audit"]["last-delivered-id"] == \
        source.client().xinfo_stream("stream:orders")["last-generated-id"]
    assert_equal(source.url(), target.url())


def test_expiry_is_absolute_and_never_extended(source, target):
    c = source.client()
    c.set("ttl", "v", px=60_000)
    deadline = c.execute_command("PEXPIRETIME", "ttl")
    time.sleep(0.3)  # transfer time must not push the expiry later
    assert run_cli("copy", "--source", source.url(), "--target", target.url()).returncode == 0
    assert target.client().execute_command("PEXPIRETIME", "ttl") == deadline


def test_keys_expiring_mid_copy_are_skipped(source, target):
    c = source.client()
    for i in range(300):
        c.set(f"short{i}", "x", px=1 + i % 40)
    c.set("stays", "1")
    time.sleep(0.05)
    res = run_cli("copy", "--source", source.url(), "--target", target.url(), "--json")
    assert res.returncode == 0, res.stderr
    assert target.client().get("stays") == b"1"
    time.sleep(0.1)
    assert target.client().keys("short*") == []


@pytest.mark.parametrize("direction", ["standalone->cluster", "cluster->standalone"])
def test_between_topologies(direction, make_server, make_cluster):
    single, cluster = make_server(), make_cluster(primaries=3)
    src, dst = (single, cluster) if direction.startswith("standalone") else (cluster, single)
    src_client = single.client() if src is single else cluster.cluster_client()
    populate(src_client, n=150)
    res = run_cli("copy", "--source", src.url(), "--target", dst.url(), "--json")
    assert res.returncode == 0, res.stderr
    assert summary(res.stdout)["keys"] == src_client.dbsize() if src is single else True
    assert_equal(src.url(), dst.url())
    if dst is cluster:  # the keys really are spread over the three primaries
        assert all(n.client().dbsize() > 100 for n in cluster.primaries)


def test_cluster_to_cluster_with_different_shard_counts(make_cluster):
    three, two = make_cluster(primaries=3), make_cluster(primaries=2)
    populate(three.cluster_client(), n=100)
    assert run_cli("copy", "--source", three.url(), "--target", two.url()).returncode == 0
    assert_equal(three.url(), two.url())


def test_big_keys_are_copied_in_chunks(source, target):
    c = source.client()
    c.set("big:str", os.urandom(300_000))
    c.hset("big:hash", mapping={f"f{i}": f"v{i}" * 5 for i in range(5000)})
    c.sadd("big:set", *[f"m{i}" for i in range(5000)])
    c.zadd("big:zset", {f"m{i}": i / 7 for i in range(5000)})
    c.rpush("big:list", *[f"e{i}" for i in range(5000)])
    for i in range(3000):
        c.xadd("big:stream", {"i": i})
    c.xgroup_create("big:stream", "g", id="0")
    c.xreadgroup("g", "worker", {"big:stream": ">"}, count=25)
    c.pexpire("big:hash", 900_000)
    c.set("small", "s")
    res = run_cli("copy", "--source", source.url(), "--target", target.url(), "--big-key-mib", "0.02", "--json")
    assert res.returncode == 0, res.stderr
    s = summary(res.stdout)
    assert s["big"] == 6 and s["keys"] == 7
    assert dump_all(target.client()) == dump_all(source.client())
    assert abs(target.client().pexpiretime("big:hash") - c.pexpiretime("big:hash")) <= 1
    assert target.client().xpending("big:stream", "g")["pending"] == 25
    assert_equal(source.url(), target.url())


def test_killed_copy_resumes_to_an_exact_result(source, target, tmp_path):
    populate(source.client(), n=1500)
    state = tmp_path / "copy.state"
    args = ["copy", "--source", source.url(), "--target", target.url(), "--state-file", str(state),
            "--scan-count", "100", "--concurrency", "2", "--max-ops", "3000", "--json"]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def checkpointed() -> int:
        """Keys the state file says were copied (0 before it exists)."""
        units = json.loads(state.read_text())["units"] if state.exists() else {}
        return sum(u["keys"] for u in units.values())

    try:
        progressed = wait_for("a checkpoint with over 1000 keys copied",
                              lambda: (keys := checkpointed()) > 1000 and keys, 30, ignore=(json.JSONDecodeError,))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    total = source.client().dbsize()
    assert 1000 < progressed < total, "the copy must be killed mid-way"
    assert 0 < target.client().dbsize() < total
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    s = summary(res.stdout)
    assert s["resumed"] is True and s["keys"] >= total
    assert dump_all(target.client()) == dump_all(source.client())


def test_rate_limit_slows_the_copy(source, target):
    populate(source.client(), n=100)  # ~530 keys, ~3 commands each
    t0 = time.monotonic()
    assert run_cli("copy", "--source", source.url(), "--target", target.url(), "--max-ops", "1000").returncode == 0
    assert time.monotonic() - t0 > 1.0


def test_acl_user_and_tls_source_with_older_server(make_server, tls_server):
    """Redis 7.0 over TLS -> Valkey 8.1 with an ACL user, and back: Valkey's newer DUMP format is not
    readable by Redis 7.0, so the way back exercises the element-by-element fallback."""
    valkey8 = make_server(password="unused", acl_user=("copier", "s3cret"))
    populate(tls_server.client(), n=40)
    acl_url = f"valkey://copier:s3cret@127.0.0.1:{valkey8.port}"
    res = run_cli("copy", "--source", tls_server.url(), "--target", acl_url, "--json")
    assert res.returncode == 0, res.stderr
    assert_equal(tls_server.url(), acl_url)
    tls_server.client().flushall()
    res = run_cli("copy", "--source", acl_url, "--target", tls_server.url(), "--json")
    assert res.returncode == 0, res.stderr
    assert summary(res.stdout)["big"] > 0  # the fallback really ran
    assert_equal(acl_url, tls_server.url())


def test_writes_rejected_for_a_while_are_retried_not_dropped(source, make_server):
    """A durable target may reject writes for a while (async durability lag over 10 s). A real server
    refusing writes the same way (NOREPLICAS: min-replicas-to-write unmet) must only slow the copy."""
    target = make_server(extra=["--min-replicas-to-write", "1"])
    populate(source.client(), n=50)
    proc = subprocess.Popen([*CLI, "copy", "--source", source.url(), "--target", target.url(), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def refused() -> int:
        """Writes the target refused so far (NOREPLICAS)."""
        return int(target.client().info("errorstats").get("errorstat_NOREPLICAS", {}).get("count", 0))

    try:
        wait_for("the target to refuse the copy's writes, and a retry refused too", lambda: refused() >= 2, 30)
    except AssertionError:
        proc.kill()
        raise
    assert proc.poll() is None, "the copy must wait while the target refuses writes"
    assert target.client().dbsize() == 0
    target.client().config_set("min-replicas-to-write", 0)  # the target accepts writes again
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert summary(out)["keys"] == source.client().dbsize()
    assert_equal(source.url(), target.url())
