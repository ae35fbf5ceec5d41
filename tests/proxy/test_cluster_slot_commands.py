"""CLUSTER subcommands that name a slot, through the proxy (one node owning every slot) against a real
3-primary cluster: each goes to the primary that owns the slot (cluster.slot_node), as a cluster client
sends it to the slot's node. Sent to any other primary, COUNTKEYSINSLOT counted that primary's keys and
DELSLOTS unassigned the slot on a node that did not serve it, so the slot's keys kept being served
(valkey-py's test_not_require_full_coverage_cluster_down_error failed whenever its key's primary was
not the proxy's first)."""

from __future__ import annotations

import pytest
import valkey
from valkey.crc import key_slot

from durablecache.testing.waiting import wait_for

pytestmark = pytest.mark.timeout(120)


def one_key_per_primary(cluster) -> dict[int, str]:
    """primary port -> a key it owns (written), for every primary."""
    direct = cluster.cluster_client()
    found: dict[int, str] = {}
    for i in range(200):
        key = f"slot-cmd:{i}"
        port = direct.get_node_from_key(key).port
        if port not in found:
            direct.set(key, "v")
            found[port] = key
        if len(found) == len(cluster.primaries):
            break
    direct.close()
    assert len(found) == 3, "a key on every primary: otherwise the proxy's first primary could be the only one"
    return found


def test_slot_subcommands_reach_the_slots_owner(make_cluster, make_proxy):
    cluster = make_cluster(primaries=3, engine="valkey9")
    keys = one_key_per_primary(cluster)
    p = make_proxy(cluster.endpoint(), migrating=False)
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    ids = {n.port: n.client().execute_command("CLUSTER", "MYID").decode() for n in cluster.primaries}
    for port, key in keys.items():
        slot = key_slot(key.encode())
        assert c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1, key
        assert c.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10) == [key.encode()], key
        # only the slot's owner may mark it MIGRATING (another primary answers "not the owner")
        other = next(i for p, i in ids.items() if p != port)
        assert c.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", other)
        assert c.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
    # a slot number the server refuses is answered by a server, not by the proxy
    with pytest.raises(valkey.ResponseError, match="slot"):
        c.execute_command("CLUSTER", "COUNTKEYSINSLOT", 99999)


def test_delslots_takes_the_slot_away_and_addslots_gives_it_back(make_cluster, make_proxy):
    """valkey-py's test_not_require_full_coverage_cluster_down_error, on a key of every primary: after
    DELSLOTS (DELSLOTSRANGE) of its slot the key's commands get CLUSTERDOWN (the primary's
    cluster-require-full-coverage is yes); ADDSLOTS (ADDSLOTSRANGE) of the slot serves the key again,
    from the same primary, and the cluster is whole."""
    cluster = make_cluster(primaries=3, engine="valkey9")
    keys = one_key_per_primary(cluster)
    p = make_proxy(cluster.endpoint(), migrating=False)
    c = valkey.Valkey(port=p.port, socket_timeout=10)
    forms = [(("DELSLOTS",), ("ADDSLOTS",)), (("DELSLOTSRANGE",), ("ADDSLOTSRANGE",))]
    for port, key in keys.items():
        slot = key_slot(key.encode())
        owner = next(n for n in cluster.primaries if n.port == port)
        for delete, add in forms:
            slots = (slot,) if delete == ("DELSLOTS",) else (slot, slot)
            assert c.execute_command("CLUSTER", *delete, *slots)
            with pytest.raises(valkey.ResponseError, match="CLUSTERDOWN"):
                c.exists(key)
            assert c.execute_command("CLUSTER", *add, *slots)
            assert c.exists(key) == 1, key
            assert owner.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1
    for node in cluster.primaries:
        wait_for(f"cluster_state:ok on {node.port}",
                 lambda node=node: node.client().cluster("info")["cluster_state"] == "ok", 30)
