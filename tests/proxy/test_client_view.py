"""What CLIENT LIST and CLIENT KILL show and select through the proxy (proxy/clients.py), on the text a
real server printed. End to end through the proxy: test_client_commands.py."""

from __future__ import annotations

import pytest

from durablecache.proxy import clients

LIST = (b"id=3 addr=127.0.0.1:50001 laddr=127.0.0.1:6379 name=durablecache-proxy-7 age=9 flags=N db=0 user=default\n"
        b"id=4 addr=127.0.0.1:50002 laddr=127.0.0.1:6379 name=durablecache-syncer age=9 flags=N db=0 user=default\n"
        b"id=5 addr=127.0.0.1:50003 laddr=127.0.0.1:6379 name=billing-cron age=1 flags=N db=0 user=default\n"
        b"id=6 addr=127.0.0.1:50004 laddr=127.0.0.1:6379 name=durablecache-proxy-8 age=2 flags=P db=0 user=app\n"
        b"id=7 addr=127.0.0.1:50005 laddr=127.0.0.1:6379 name= age=30 flags=S db=0 user=default\n")
NAMES = {b"durablecache-proxy-7": b"web-1", b"durablecache-proxy-8": None}


def seen():
    return clients.view(LIST, lambda n: NAMES.get(n, False))


def test_sessions_show_their_own_names_and_durablecache_is_hidden():
    view = seen()
    assert [clients.field(c, b"id") for c in view] == [b"3", b"5", b"6", b"7"]
    assert [clients.field(c, b"name") for c in view] == [b"web-1", b"billing-cron", b"", b""]
    assert b"durablecache" not in clients.render(view)


def test_type_normal_skipme_never_reaches_durablecache_nor_the_caller():
    victims, old = clients.kill_victims([b"TYPE", b"normal", b"SKIPME", b"yes"], seen(), me={b"3"})
    assert victims == [b"5"] and not old
    victims, _ = clients.kill_victims([b"TYPE", b"normal", b"SKIPME", b"no"], seen(), me={b"3"})
    assert victims == [b"3", b"5"]


@pytest.mark.parametrize("args,victims", [
    ([b"ID", b"6"], [b"6"]), ([b"USER", b"app"], [b"6"]), ([b"ADDR", b"127.0.0.1:50003"], [b"5"]),
    ([b"TYPE", b"pubsub"], [b"6"]), ([b"TYPE", b"slave"], [b"7"]), ([b"MAXAGE", b"5"], [b"7"]),
    ([b"LADDR", b"127.0.0.1:6379", b"TYPE", b"normal"], [b"5"]),
])
def test_filters(args, victims):
    assert clients.kill_victims(args, seen(), me={b"3"})[0] == victims


def test_old_form_and_refusals():
    assert clients.kill_victims([b"127.0.0.1:50003"], seen(), set()) == ([b"5"], True)
    assert clients.kill_victims([b"127.0.0.1:50002"], seen(), set()) == ([], True)   # DurableCache's own
    with pytest.raises(clients.KillError, match="NAME is not supported"):
        clients.kill_victims([b"NAME", b"x"], seen(), set())
    with pytest.raises(clients.KillError, match="Unknown client type"):
        clients.kill_victims([b"TYPE", b"nobody"], seen(), set())
