"""The client readiness report (docs/limits.md, "Client readiness"): what the proxy learns about each
client connection, grouped by library, version and host, in bounded memory; and the judgement of the
merged report against a target."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import valkey
from valkey.cluster import ValkeyCluster

from durablecache import readiness as engine
from durablecache.proxy import readiness
from durablecache.proxy.readiness import MAX_DBS, MAX_GROUPS, Readiness
from durablecache.testing.waiting import wait_for

pytestmark = pytest.mark.timeout(120)


# -- aggregation (no server) --------------------------------------------------------------------
def test_connections_are_grouped_by_library_version_and_host_and_counted_open_and_closed() -> None:
    r = Readiness()
    a = r.opened(1, "10.0.0.1")
    a.setinfo(b"LIB-NAME", b"valkey-py")
    a.setinfo(b"lib-ver", b"6.2.0")
    b = r.opened(2, "10.0.0.1")
    b.setinfo(b"lib-name", b"valkey-py")
    b.setinfo(b"lib-ver", b"6.2.0")
    b.selected(3)
    b.used(b"config")
    c = r.opened(3, "10.0.0.2")
    c.cluster = True
    c.resp = 3
    r.ended(2)
    r.ended(2)      # a second end of the same connection counts nothing
    report = r.report()
    assert report["connections"] == 3 and report["open"] == 2 and report["otherConnections"] == 0
    py, unnamed = report["groups"][1], report["groups"][0]
    assert py == {"lib": "valkey-py", "version": "6.2.0", "address": "10.0.0.1", "mode": "standalone",
                  "connections": 2, "open": 1, "resp": [2], "databases": [3], "restricted": ["CONFIG"]}
    assert unnamed["lib"] == "" and unnamed["mode"] == "cluster" and unnamed["resp"] == [3]


def test_one_cluster_question_makes_the_whole_group_cluster_aware() -> None:
    """A cluster client asks for the topology on one connection and sends only keyed commands on its
    per-node connections: the group is cluster-aware once any of its connections asked."""
    r = Readiness()
    for sid in range(4):
        f = r.opened(sid, "10.0.0.9")
        f.setinfo(b"lib-name", b"valkey-py")
        f.cluster = sid == 0
    r.ended(0)
    [group] = r.report()["groups"]
    assert group["mode"] == "cluster" and group["connections"] == 4 and group["open"] == 3


def test_memory_is_bounded_past_the_group_cap_only_counts() -> None:
    r = Readiness()
    for sid in range(MAX_GROUPS + 50):
        f = r.opened(sid, f"10.1.{sid // 256}.{sid % 256}")
        for db in range(MAX_DBS + 5):
            f.selected(db)
        r.ended(sid)
    report = r.report()
    assert len(r.closed) == MAX_GROUPS and len(report["groups"]) == MAX_GROUPS
    assert report["otherConnections"] == 50 and report["connections"] == MAX_GROUPS + 50
    assert all(len(g["databases"]) == MAX_DBS for g in report["groups"])
    assert not r.live


def test_merged_reports_of_several_proxies_add_up_and_are_judged_against_the_target() -> None:
    one = {"groups": [{"lib": "valkey-py", "version": "6.2.0", "address": "10.0.0.1", "mode": "standalone",
                       "connections": 2, "open": 2, "resp": [2], "databases": [], "restricted": []}],
           "otherConnections": 1}
    two = {"groups": [{"lib": "valkey-py", "version": "6.2.0", "address": "10.0.0.1", "mode": "standalone",
                       "connections": 3, "open": 1, "resp": [3], "databases": [2], "restricted": ["DEBUG"]},
                      {"lib": "GlidePy", "version": "2.6.0", "address": "10.0.0.3", "mode": "cluster",
                       "connections": 1, "open": 1, "resp": [3], "databases": [], "restricted": []}],
           "otherConnections": 0}
    merged = engine.merge([one, two])
    assert [g["lib"] for g in merged["groups"]] == ["GlidePy", "valkey-py"]
    py = merged["groups"][1]
    assert (py["connections"], py["open"], py["resp"], py["databases"]) == (5, 3, [2, 3], [2])
    cluster_target = engine.assess(merged, target_cluster=True)
    assert not cluster_target["ready"]
    assert (cluster_target["connections"], cluster_target["standaloneConnections"],
            cluster_target["clusterConnections"]) == (7, 5, 1)
    first = cluster_target["problems"][0]
    assert first.startswith("5 connections from standalone-mode clients (valkey-py 6.2.0 from 10.0.0.1 "
                            "(5 connections)); after cutover they will reach a cluster-mode endpoint")
    assert "spec.endpoint.afterCutover: proxy" in first
    assert "database(s) [2]" in cluster_target["problems"][1]
    assert "DEBUG" in cluster_target["problems"][2] and "ElastiCache refuses" in cluster_target["problems"][2]
    standalone_target = engine.assess(merged, target_cluster=False)
    assert len(standalone_target["problems"]) == 1 and "DEBUG" in standalone_target["problems"][0]


def test_a_source_client_list_is_read_as_a_report() -> None:
    text = (b"id=5 addr=10.0.0.7:4411 laddr=x fd=8 name= db=1 flags=N resp=2 lib-name=valkey-py lib-ver=6.2.0\n"
            b"id=6 addr=10.0.0.7:4412 laddr=x fd=9 name= db=0 flags=N resp=3 lib-name=valkey-py lib-ver=6.2.0\n"
            b"id=7 addr=10.0.0.8:1 laddr=x fd=10 name=durablecache-watch db=0 flags=N resp=2 lib-name= lib-ver=\n"
            b"id=8 addr=10.0.0.9:2 laddr=x fd=11 name= db=0 flags=S resp=2 lib-name= lib-ver=\n")
    report = engine.client_list_groups(text)
    assert report["groups"] == [{"lib": "valkey-py", "version": "6.2.0", "address": "10.0.0.7", "mode": "standalone",
                                 "connections": 2, "open": 2, "resp": [2, 3], "databases": [1], "restricted": []}]


# -- through a real proxy -----------------------------------------------------------------------
def wait_report(p: Any, ok: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The proxy's report once ``ok(report)`` holds (bounded)."""

    def report() -> dict[str, Any]:
        return dict(p.call(p.proxy.readiness.report))

    def matching() -> dict[str, Any] | None:
        now = report()
        return now if ok(now) else None

    return wait_for("the readiness report to match", matching, timeout, describe=report)


def by_lib(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["lib"]: g for g in report["groups"]}


def test_the_proxy_names_standalone_and_cluster_clients_with_library_version_and_mode(make_cluster, make_proxy):
    cluster = make_cluster(primaries=3)
    p = make_proxy(cluster.endpoint())
    plain = valkey.Valkey(port=p.port, socket_timeout=10, lib_name="shop-cart", lib_version="1.4.2")
    plain.set("a", "1")
    plain.execute_command("CONFIG", "GET", "maxmemory")
    rc = ValkeyCluster(host="127.0.0.1", port=p.port, socket_timeout=10, lib_name="shop-sessions",
                       lib_version="2.0.0")
    for i in range(20):
        rc.set(f"s:{i}", i)
    report = wait_report(p, lambda r: {"shop-cart", "shop-sessions"} <= set(by_lib(r)))
    groups = by_lib(report)
    cart, sessions = groups["shop-cart"], groups["shop-sessions"]
    assert (cart["version"], cart["mode"], cart["address"], cart["restricted"]) == ("1.4.2", "standalone",
                                                                                   "127.0.0.1", ["CONFIG"])
    assert (sessions["version"], sessions["mode"]) == ("2.0.0", "cluster")
    assert cart["open"] >= 1 and sessions["open"] >= 1
    verdict = engine.assess(report, target_cluster=True)
    assert any(pr.startswith(f"{cart['connections']} connections from standalone-mode clients (shop-cart 1.4.2 "
                             "from 127.0.0.1") for pr in verdict["problems"])
    assert "shop-sessions" not in verdict["problems"][0]
    # Closed connections stay in the report, counted as no longer open.
    plain.close()
    rc.close()
    closed = wait_report(p, lambda r: by_lib(r)["shop-cart"]["open"] == 0 and by_lib(r)["shop-sessions"]["open"] == 0)
    assert by_lib(closed)["shop-cart"]["connections"] == cart["connections"]


def test_database_and_resp_version_are_reported_standalone(source, make_proxy):
    p = make_proxy(source.endpoint())
    c = valkey.Valkey(port=p.port, db=2, protocol=3, socket_timeout=10, lib_name="billing", lib_version="0.9")
    c.set("x", "1")
    group = by_lib(wait_report(p, lambda r: "billing" in by_lib(r)))["billing"]
    assert (group["databases"], group["resp"], group["mode"]) == ([2], [3], "standalone")


def test_glide_clients_are_named_with_their_mode(source, make_cluster, make_proxy):
    glide = pytest.importorskip("glide", reason="pip install valkey-glide")
    ps = make_proxy(source.endpoint())
    cluster = make_cluster(primaries=3)
    pc = make_proxy(cluster.endpoint())

    async def main() -> None:
        client = await glide.GlideClient.create(glide.GlideClientConfiguration(
            [glide.NodeAddress("127.0.0.1", ps.port)], request_timeout=5000))
        await client.set("g", "1")
        cc = await glide.GlideClusterClient.create(glide.GlideClusterClientConfiguration(
            [glide.NodeAddress("127.0.0.1", pc.port)], request_timeout=5000))
        await cc.set("g", "1")
        await client.close()
        await cc.close()
    asyncio.run(asyncio.wait_for(main(), 60))
    standalone = wait_report(ps, lambda r: any(g["lib"] for g in r["groups"]))
    clustered = wait_report(pc, lambda r: any(g["lib"] for g in r["groups"]))
    [s] = [g for g in standalone["groups"] if g["lib"]]
    [c] = [g for g in clustered["groups"] if g["lib"]]
    assert s["lib"].lower().startswith("glide") and s["version"] and s["mode"] == "standalone"
    assert c["lib"].lower().startswith("glide") and c["mode"] == "cluster" and 3 in c["resp"]


def test_restricted_names_are_the_ones_docs_aws_lists() -> None:
    """The report's "commands ElastiCache refuses" are the ones docs/aws.md lists, no more, no fewer."""
    text = (Path(__file__).parents[2] / "docs" / "aws.md").read_text()
    section = text.split("## Commands ElastiCache refuses", 1)[1].split(", nor, in cluster mode", 1)[0]
    listed = {w.lower().encode() for w in re.findall(r"`([A-Z]+)`", section)}
    assert listed == readiness.RESTRICTED
