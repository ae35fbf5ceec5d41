"""Bad input ends in one clear line and a non-zero exit, with nothing written."""

from __future__ import annotations

import time

from durablecache.ports import free_port
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


def test_verify_of_a_server_against_itself_is_refused(source):
    """As copy and migrate do: a verify of a server with itself would print `equal` and prove nothing."""
    source.client().set("a", "1")
    res = run_cli("verify", "--source", source.url(), "--target", f"valkey://localhost:{source.port}")
    one_line_error(res, "same server", "proves nothing")
    assert "equal" not in res.stdout


def test_verify_sample_must_be_positive(source, target):
    for n in ("-5", "0"):
        res = run_cli("verify", "--source", source.url(), "--target", target.url(), "--sample", n)
        one_line_error(res, "--sample must be a positive number", n)
    ok = run_cli("verify", "--source", source.url(), "--target", target.url(), "--sample", "5")
    assert ok.returncode == 0 and "sampled" in ok.stdout, ok


def test_a_database_in_copy_or_verify_urls_is_refused(source, target):
    """copy and verify work on whole servers (every db into the same number): a /1 in a URL would be
    silently ignored (the copy went to db 0 and the emptiness check counted every db), so it is refused."""
    source.client().set("a", "1")
    res = run_cli("copy", "--source", source.url(), "--target", target.url(db=1))
    one_line_error(res, "--target", "whole servers", "drop /1")
    assert target.client().dbsize() == 0 and target.client(db=1).dbsize() == 0
    res = run_cli("verify", "--source", source.url(db=2), "--target", target.url())
    one_line_error(res, "--source", "drop /2")
    # /0 names what is used anyway (the operator's worker writes it): accepted.
    ok = run_cli("copy", "--source", source.url(db=0), "--target", target.url(db=0))
    assert ok.returncode == 0 and target.client().get("a") == b"1", ok


def test_every_accepted_scheme_is_named(source, target):
    source.client().set("a", "1")
    res = run_cli("copy", "--source", "http://h:1", "--target", target.url())
    one_line_error(res, "valkey://", "redis://", "valkeys://", "rediss://")
    ok = run_cli("copy", "--source", f"redis://127.0.0.1:{source.port}", "--target", target.url())
    assert ok.returncode == 0 and target.client().get("a") == b"1", ok


def test_tls_url_to_a_plain_tcp_port_names_the_handshake(source, target):
    started = time.monotonic()
    res = run_cli("verify", "--source", f"valkeys://127.0.0.1:{source.port}?insecure=1", "--target", target.url())
    elapsed = time.monotonic() - started
    one_line_error(res, f"TLS handshake with 127.0.0.1:{source.port} failed — is it a plain-TCP port?")
    assert "timed out" not in res.stderr
    assert elapsed < 10, elapsed  # the handshake's own bound (3 s) plus start-up, not 5 s per retry


def test_an_untrusted_tls_certificate_is_named(tls_server, target):
    res = run_cli("verify", "--source", f"valkeys://:tls-secret@127.0.0.1:{tls_server.port}",
                  "--target", target.url())
    one_line_error(res, f"TLS handshake with 127.0.0.1:{tls_server.port} failed: certificate verify failed",
                   "?ca=")
    assert "tls-secret" not in res.stderr


def test_password_from_a_file_or_the_environment(make_server, target, tmp_path):
    """Out of the command line (`ps` shows it there): --source-password-file, or the environment."""
    locked = make_server(password="right-pw")
    locked.client().set("a", "1")
    pw = tmp_path / "pw"
    pw.write_text("right-pw\n")
    pw.chmod(0o600)
    url = f"valkey://127.0.0.1:{locked.port}"
    ok = run_cli("copy", "--source", url, "--target", target.url(), "--source-password-file", str(pw))
    assert ok.returncode == 0 and target.client().get("a") == b"1", ok
    assert ok.stderr == "", ok.stderr  # owner-only file: no warning
    ok = run_cli("verify", "--source", url, "--target", target.url(),
                 env={"DURABLECACHE_SOURCE_PASSWORD": "right-pw"})
    assert ok.returncode == 0 and ok.stdout.startswith("equal"), ok
    # The target side works the same way (verify in the other direction).
    ok = run_cli("verify", "--source", target.url(), "--target", url, "--target-password-file", str(pw))
    assert ok.returncode == 0, ok
    # A wrong password from the environment fails like one in the URL, and is not echoed.
    res = run_cli("verify", "--source", url, "--target", target.url(), env={"DURABLECACHE_SOURCE_PASSWORD": "nope-pw"})
    one_line_error(res, "authentication failed")
    assert "nope-pw" not in res.stderr
    # Two passwords for one side: which one is meant? Refused.
    res = run_cli("copy", "--source", f"valkey://:x@127.0.0.1:{locked.port}", "--target", target.url(),
                  "--source-password-file", str(pw), "--allow-nonempty")
    one_line_error(res, "give it once")
    # A file others may read works, with a warning that names it (and never the password).
    pw.chmod(0o644)
    ok = run_cli("verify", "--source", url, "--target", target.url(), "--source-password-file", str(pw))
    assert ok.returncode == 0, ok
    assert "can be read by other users (mode 0644)" in ok.stderr and str(pw) in ok.stderr, ok.stderr
    assert "right-pw" not in ok.stderr + ok.stdout


def test_password_files_are_offered_and_explained_in_the_help():
    for command in ("copy", "verify", "migrate"):
        res = run_cli(command, "--help")
        text = " ".join(res.stdout.split())
        assert "--source-password-file" in text and "--target-password-file" in text, text
        assert "DURABLECACHE_SOURCE_PASSWORD" in text and "DURABLECACHE_TARGET_PASSWORD" in text, text
        assert "`ps`" in text, text


def test_every_option_of_every_subcommand_has_help():
    import argparse

    from durablecache.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings[0]}" for name, p in sub.choices.items() for a in p._actions
               if a.option_strings and not a.help]
    assert missing == []
    migrate = " ".join(sub.choices["migrate"].format_help().split())
    assert "--gate-settle DUR RouteIn gate" in migrate and "--gate-timeout DUR RouteIn gate" in migrate


def test_acl_user_in_the_url_with_its_password_in_a_file(make_server, target, tmp_path):
    """valkey://USER@host alone means "AUTH USER" (a token); with a password file it names the ACL user."""
    server = make_server(password="admin", acl_user=("copier", "copier-pw"))
    server.client().set("a", "1")
    pw = tmp_path / "pw"
    pw.write_text("copier-pw\n")
    pw.chmod(0o600)
    url = f"valkey://copier@127.0.0.1:{server.port}"
    ok = run_cli("copy", "--source", url, "--target", target.url(), "--source-password-file", str(pw))
    assert ok.returncode == 0 and target.client().get("a") == b"1", ok
    ok = run_cli("verify", "--source", url, "--target", target.url(), env={"DURABLECACHE_SOURCE_PASSWORD": "copier-pw"})
    assert ok.returncode == 0 and ok.stdout.startswith("equal"), ok
    # The URL's own password wins over the environment's.
    ok = run_cli("verify", "--source", f"valkey://copier:copier-pw@127.0.0.1:{server.port}", "--target", target.url(),
                 env={"DURABLECACHE_SOURCE_PASSWORD": "stale"})
    assert ok.returncode == 0, ok
