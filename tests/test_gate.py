"""The RouteIn gate's reading of CLIENT LIST (gate.py): our own connections are left out unparsed, and
nothing else is — a real server's CLIENT LIST, with a client whose *library* name looks like ours."""

from __future__ import annotations

from durablecache.gate import is_foreign, others_in_client_list
from durablecache.testing.localvalkey import LocalServer


def test_own_connections_are_left_out_and_every_other_client_is_kept() -> None:
    server = LocalServer().start()
    try:
        own = server.client(client_name="durablecache-proxy-7")
        lookalike = server.client(client_name="app-1")
        lookalike.execute_command("CLIENT", "SETINFO", "LIB-NAME", "durablecache-lookalike")
        unnamed = server.client()
        own.ping(), lookalike.ping(), unnamed.ping()
        listing = unnamed.execute_command("CLIENT", "LIST")
        others = others_in_client_list(listing)
        names = sorted(c.get("name", "") for c in others)
        assert names == ["", "app-1"], listing
        assert all(is_foreign(c, []) for c in others)
        assert not [c for c in others if is_foreign(c, ["app-1", "127.0.0.1"])]
        for c in (own, lookalike, unnamed):
            c.close()
    finally:
        server.stop()


def test_a_listing_of_only_our_own_connections_is_empty() -> None:
    text = ("id=3 addr=127.0.0.1:5 laddr=127.0.0.1:6379 fd=8 name=durablecache-proxy-1 flags=N db=0 cmd=ping\n"
            "id=4 addr=127.0.0.1:6 laddr=127.0.0.1:6379 fd=9 name=durablecache-gate flags=N db=0 cmd=client|list\n")
    assert others_in_client_list(text) == []
    assert others_in_client_list(text.encode()) == []
