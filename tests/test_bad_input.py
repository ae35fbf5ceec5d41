"""Bad input ends in one clear line and a non-zero exit, with nothing written."""

from __future__ import annotations

from durablecache.localvalkey import free_port
from keyspace import run_cli


def one_line_error(res, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unreachable_server(target):
    res = run_cli("copy", "--source", f"valkey://127.0.0.1:{free_port()}", "--target", target.url())
    one_line_error(res, "cannot reach 127.0.0.1")


def test_wrong_password_is_not_echoed(make_server, target):
    locked = make_server(password="right")
    res = run_cli("copy", "--source", f"valkey://:wrong-pw@127.0.0.1:{locked.port}", "--target", target.url())
    one_line_error(res, "authentication failed")
    assert "wrong-pw" not in res.stderr


def test_missing_password(make_server, target):
    locked = make_server(password="right")
    res = run_cli("verify", "--source", f"valkey://127.0.0.1:{locked.port}", "--target", target.url())
    one_line_error(res, "requires a password")


def test_nonempty_target_is_refused_unless_allowed(source, target):
    source.client().set("a", "1")
    target.client().set("mine", "keep")
    res = run_cli("copy", "--source", source.url(), "--target", target.url())
    one_line_error(res, "not empty", "--allow-nonempty")
    assert target.client().keys() == [b"mine"]
    ok = run_cli("copy", "--source", source.url(), "--target", target.url(), "--allow-nonempty")
    assert ok.returncode == 0 and target.client().get("a") == b"1"


def test_source_equal_to_target_is_refused(source):
    source.client().set("a", "1")
    res = run_cli("copy", "--source", source.url(), "--target", f"valkey://localhost:{source.port}")
    one_line_error(res, "same server")


def test_malformed_urls(source):
    for bad, why in [("localhost:6379", "malformed URL"), ("http://h:1", "scheme"),
                     ("valkey://h:notaport", "malformed URL"), ("valkey://h:1/x", "database must be a number")]:
        res = run_cli("copy", "--source", bad, "--target", source.url())
        one_line_error(res, why)


def test_db_keys_cannot_go_to_a_cluster(source, make_cluster):
    source.client(db=2).set("k", "v")
    cluster = make_cluster(primaries=3)
    res = run_cli("copy", "--source", source.url(), "--target", cluster.url())
    one_line_error(res, "database(s) [2]")
    assert sum(n.client().dbsize() for n in cluster.primaries) == 0


def test_state_file_of_another_copy_is_refused(source, target, make_server, tmp_path):
    state = tmp_path / "s.json"
    source.client().set("a", "1")
    first = run_cli("copy", "--source", source.url(), "--target", target.url(), "--state-file", str(state))
    assert first.returncode == 0
    other = make_server()
    res = run_cli("copy", "--source", source.url(), "--target", other.url(), "--state-file", str(state))
    one_line_error(res, "checkpoint belongs to another copy")
    assert other.client().dbsize() == 0


def test_a_write_the_target_refuses_fails_the_copy(source, make_server):
    """Never exit 0 with a key missing: here the target's ACL forbids one key."""
    target = make_server(password="admin", acl_user=("copier", "pw"))
    target.client().execute_command("ACL", "SETUSER", "copier", "resetkeys", "~ok:*")
    c = source.client()
    for i in range(3000):
        c.set(f"ok:{i}", i)
    c.set("forbidden", "x")
    res = run_cli("copy", "--source", source.url(), "--target", f"valkey://copier:pw@127.0.0.1:{target.port}",
                  "--scan-count", "100")
    one_line_error(res, "target:", "NOPERM")
