"""The fan-out merges (proxy/fanout.py) on real replies: each case feeds what real primaries answered.

The end-to-end behaviour through the proxy against a 3-primary cluster is in test_cluster_fanout.py;
these pin the merge rules themselves, including the corner cases a cluster rarely shows on demand
(an error from one primary, a db present on one shard only, RESP3 verbatim strings).
"""

from __future__ import annotations

import pytest

from durablecache.proxy import fanout
from durablecache.proxy.fanout import Policy


def test_policies_come_from_the_tips():
    assert fanout.policy_from_tips([b"request_policy:all_shards", b"response_policy:agg_sum"]).response == "agg_sum"
    assert fanout.policy_from_tips([b"request_policy:all_nodes"]).response == ""
    assert fanout.policy_from_tips([b"request_policy:multi_shard", b"response_policy:agg_sum"]) is None
    assert fanout.policy_from_tips([b"nondeterministic_output"]) is None


def test_sum_min_logical_and_and_concatenation():
    labels = [b"a", b"b", b"c"]
    three = [b":3\r\n", b":0\r\n", b":4\r\n"]
    assert fanout.merge(b"dbsize", Policy("all_shards", "agg_sum"), three, labels) == b":7\r\n"
    assert fanout.merge(b"wait", Policy("all_shards", "agg_min"), three, labels) == b":0\r\n"
    exists = fanout.merge(b"script", Policy("all_nodes", "agg_logical_and"),
                          [b"*2\r\n:1\r\n:1\r\n", b"*2\r\n:1\r\n:0\r\n", b"*2\r\n:1\r\n:1\r\n"], labels)
    assert exists == b"*2\r\n:1\r\n:0\r\n"
    keys = fanout.merge(b"keys", Policy("all_shards", ""),
                        [b"*1\r\n$1\r\na\r\n", b"*0\r\n", b"*2\r\n$1\r\nb\r\n$1\r\nc\r\n"], labels)
    assert keys == b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n"


def test_errors_win_except_for_one_succeeded():
    labels = [b"a", b"b"]
    err = b"-NOPERM this user has no permissions\r\n"
    assert fanout.merge(b"flushall", Policy("all_shards", "all_succeeded"), [b"+OK\r\n", err], labels) == err
    assert fanout.merge(b"dbsize", Policy("all_shards", "agg_sum"), [err, b":1\r\n"], labels) == err
    notbusy = b"-NOTBUSY No scripts in execution right now.\r\n"
    assert fanout.merge(b"script", Policy("all_shards", "one_succeeded"), [notbusy, b"+OK\r\n"], labels) == b"+OK\r\n"
    assert fanout.merge(b"script", Policy("all_shards", "one_succeeded"), [notbusy, notbusy], labels) == notbusy


def test_info_keyspace_is_summed_and_the_rest_is_the_first_primarys():
    a = b"# Server\r\nvalkey_version:9.1.2\r\n\r\n# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=1000\r\n"
    b = (b"# Server\r\nvalkey_version:9.1.2\r\n\r\n# Keyspace\r\n"
         b"db0:keys=2,expires=1,avg_ttl=3000\r\ndb2:keys=5,expires=0,avg_ttl=0\r\n")
    merged = fanout.merge_info([a, b])
    assert b"db0:keys=5,expires=2,avg_ttl=2000" in merged
    assert b"db2:keys=5,expires=0,avg_ttl=0" in merged
    assert merged.startswith(b"# Server\r\nvalkey_version:9.1.2")
    frame = b"=%d\r\ntxt:%s\r\n" % (len(a) + 4, a)            # RESP3 verbatim stays verbatim
    out = fanout.merge(b"info", Policy("all_shards", "special"), [frame, fanout.text_like(frame, b)], [b"x", b"y"])
    assert out.startswith(b"=") and b"db0:keys=5" in fanout.text_of(out)


def test_randomkey_prefers_a_key_over_an_empty_shard():
    replies = [b"$-1\r\n", b"$3\r\nkey\r\n", b"$-1\r\n"]
    assert fanout.merge(b"randomkey", Policy("all_shards", "special"), replies, [b"a", b"b", b"c"]) == b"$3\r\nkey\r\n"
    assert fanout.is_null(fanout.merge(b"randomkey", Policy("all_shards", "special"), [b"_\r\n"], [b"a"]))


@pytest.mark.parametrize("shard,cursor,side", [(0, 0, 0), (2, 17, 0), (1, 2**52, 1), (1023, 5, 1)])
def test_scan_cursor_round_trip(shard, cursor, side):
    assert fanout.parse_scan_cursor(fanout.scan_cursor(shard, cursor, side)) == (shard, cursor, side)


def test_scan_walks_every_shard_and_ends_at_zero():
    assert fanout.next_scan_cursor(0, 3, 0, 0) == fanout.scan_cursor(1, 0, 0) != 0
    assert fanout.next_scan_cursor(1, 3, 42, 0) == fanout.scan_cursor(1, 42, 0)
    assert fanout.next_scan_cursor(2, 3, 0, 0) == 0
