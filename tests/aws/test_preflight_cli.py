"""``durablecache preflight`` against moto server: exit codes, every violation with its fix, JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from durablecache.cli import main

CLI = [sys.executable, "-m", "durablecache.cli"]
TOKEN = "a-valid-token-0123456789"


def run_cli(moto_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command in a child process (what a user runs)."""
    return subprocess.run([*CLI, "preflight", "--endpoint-url", moto_url, "--region", "us-east-1", *args],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ),
                          cwd=Path(__file__).parent)


def test_exit_0_when_a_durable_target_can_be_created(moto_url: str, make_source: Callable[..., str]) -> None:
    src = make_source(node_type="cache.r6g.large")
    done = run_cli(moto_url, "--source-replication-group", src, "--durability", "sync")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"source: {src} (redis 7.1, cluster mode enabled, 2 shard(s) x 1 replica(s), cache.r6g.large)" \
        in done.stdout
    assert "OK: a durable target can be created as asked" in done.stdout


def test_exit_1_lists_every_violation_with_its_fix(moto_url: str, make_source: Callable[..., str]) -> None:
    src = make_source(node_type="cache.t4g.medium")
    done = run_cli(moto_url, "--source-replication-group", src, "--durability", "async",
                   "--engine-version", "8.1", "--replicas", "0")
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "VIOLATION target.engineVersion [--engine-version]: Valkey 8.1 has no durability" in out
    assert ("VIOLATION target.nodeType [--node-type]: cache.t4g.medium (carried from the source) is not in a "
            "node family that supports durability") in out
    assert "fix: set nodeType to cache.r7g.large" in out
    assert "VIOLATION target.replicasPerShard [--replicas]" in out
    assert "NOT OK: 3 violation(s)" in out


def test_exit_2_when_the_source_does_not_exist(moto_url: str) -> None:
    done = run_cli(moto_url, "--source-replication-group", "no-such-group", "--durability", "sync")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "durablecache preflight: error: source replication group 'no-such-group' not found (check the id and "
        "the region; a Serverless cache is not a replication group)"]
    assert "Traceback" not in done.stderr


def test_json_output_and_write_rate_warning(moto_url: str, make_source: Callable[..., str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = make_source(shards=2)
    code = main(["preflight", "--endpoint-url", moto_url, "--source-replication-group", src, "--durability",
                 "sync", "--write-rate", "300", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["ok"] is True
    assert result["target"]["replicationGroupId"] == f"{src}-durable"
    assert result["target"]["shards"] == 2 and "shards" in result["target"]["carriedFromSource"]
    assert result["warnings"] == [{
        "field": "target.shards",
        "message": "the source writes about 300 MiB/s: 150 MiB/s per shard over 2 shard(s), and a durable "
                   "primary accepts at most 100 MiB/s (uneven keys can push one shard over)",
        "suggestion": "use at least 4 shards"}]
    code = main(["preflight", "--endpoint-url", moto_url, "--source-replication-group", src, "--durability",
                 "sync", "--write-rate", "300", "--shards", "4", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["warnings"] == []


def test_auth_is_a_reminder_without_a_token_and_checked_with_one(
        moto_url: str, make_source: Callable[..., str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_source(auth_token=TOKEN)
    base = ["preflight", "--endpoint-url", moto_url, "--source-replication-group", src, "--durability", "sync"]
    assert main([*base, "--json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert [w["field"] for w in warnings] == ["target.authSecretRef"]

    monkeypatch.setenv("DC_TEST_TOKEN", "tinyTOK")
    assert main([*base, "--auth-token-env", "DC_TEST_TOKEN"]) == 1
    out = capsys.readouterr().out
    assert "the AUTH token (7 characters) is not accepted" in out and "tinyTOK" not in out
    assert main([*base, "--auth-token-env", "DC_UNSET_VARIABLE"]) == 2
    assert "environment variable DC_UNSET_VARIABLE is not set" in capsys.readouterr().err


def test_bad_arguments_are_usage_errors(moto_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["preflight", "--source-replication-group", "x", "--durability", "default"])
    assert exc.value.code == 2
    assert "invalid choice: 'default'" in capsys.readouterr().err
