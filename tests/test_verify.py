"""The verifier finds every kind of planted difference and passes on equal keyspaces."""

from __future__ import annotations

import json

import pytest

from keyspace import populate, run_cli


def verify(source, target, *extra: str) -> tuple[int, dict]:
    res = run_cli("verify", "--source", source.url(), "--target", target.url(), "--json", *extra)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout.splitlines()[-1])


@pytest.fixture
def copied(source, target):
    populate(source.client(), n=100)
    assert run_cli("copy", "--source", source.url(), "--target", target.url()).returncode == 0
    return source, target


def test_equal_keyspaces_pass(copied):
    code, report = verify(*copied)
    assert code == 0 and report["equal"] and report["checked"] == copied[0].client().dbsize()


@pytest.mark.parametrize(
    ("kind", "plant"),
    [
        ("missing", lambda t: t.delete("str:5")),
        ("extra", lambda t: t.set("only-on-target", "x")),
        ("type", lambda t: (t.delete("str:6"), t.rpush("str:6", "x"))),
        ("value", lambda t: t.hset("hash:7", "f0", "changed")),
        ("value", lambda t: t.zadd("zset:9", {"m0": 99})),
        ("value", lambda t: t.xadd("stream:orders", {"late": 1})),
        ("ttl", lambda t: t.pexpire("str:8", 99_000_000)),
        ("ttl", lambda t: t.persist("str:9")),
    ],
)
def test_each_planted_difference_is_found(copied, kind, plant):
    source, target = copied
    plant(target.client())
    code, report = verify(source, target)
    assert code == 1 and not report["equal"]
    assert report["differences"][kind] == 1
    assert sum(report["differences"].values()) == 1, report
    assert report["examples"][0]["kind"] == kind


def test_encoding_differences_are_not_value_differences(source, target):
    # Same hash, different internal encodings (listpack vs hashtable) and insertion orders.
    source.client().hset("h", mapping={f"f{i}": i for i in range(200)})
    t = target.client()
    t.config_set("hash-max-listpack-entries", 1)
    for i in reversed(range(200)):
        t.hset("h", f"f{i}", i)
    assert source.client().object("encoding", "h") != t.object("encoding", "h")
    code, report = verify(source, target)
    assert code == 0, report


def test_ttl_tolerance(source, target):
    source.client().set("k", "v", px=100_000)
    target.client().set("k", "v", px=100_400)
    assert verify(source, target)[0] == 0
    assert verify(source, target, "--ttl-tolerance-ms", "100")[0] == 1


def test_big_values_compared_in_chunks(source, target):
    for c in (source.client(), target.client()):
        c.hset("big", mapping={f"f{i}": i for i in range(4000)})
        c.zadd("bigz", {f"m{i}": i for i in range(4000)})
    target.client().hset("big", "f3999", "other")
    code, report = verify(source, target)
    assert code == 1 and report["differences"]["value"] == 1 and report["examples"][0]["key"] == "big"


def test_sampled_verify(copied):
    source, target = copied
    code, report = verify(source, target, "--sample", "50")
    assert code == 0 and report["sampled"] and 0 < report["checked"] <= 50
    target.client().flushall()
    code, report = verify(source, target, "--sample", "50")
    assert code == 1 and report["differences"]["missing"] > 0


def test_human_output(copied):
    source, target = copied
    target.client().delete("str:1")
    res = run_cli("verify", "--source", source.url(), "--target", target.url())
    assert res.returncode == 1 and res.stdout.startswith("DIFFERENT: 1 missing") and "'str:1'" in res.stdout


def test_a_stale_copy_about_to_expire_on_the_target_is_a_difference(source, target):
    source.client().set("k", "v")  # no expiry on the source ...
    target.client().set("k", "v", px=2500)  # ... but the target's copy is about to vanish
    code, report = verify(source, target, "--ttl-tolerance-ms", "3000")
    assert code == 1 and report["differences"]["ttl"] == 1
