"""The README's main command: `durablecache demo` runs a whole migration and reports no lost write."""

from __future__ import annotations

import pytest

from keyspace import run_cli


@pytest.mark.parametrize("extra", [[], ["--cluster"]], ids=["standalone", "cluster"])
def test_demo_reports_a_lossless_migration(extra):
    res = run_cli("demo", "--keys", "3000", "--writers", "2", "--rate", "200", *extra, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = dict(line.strip().rsplit(None, 1) for line in res.stdout.splitlines()
                  if line.startswith("  ") and line.strip().split()[0] in ("writes", "verify", "keys"))
    assert report["writes lost"] == "0"
    assert report["verify (source vs target)"] == "equal"
    assert int(report["keys copied"]) >= 3000
    # Each phase is announced once, in protocol order (issue #20: `phase Sync` used to print twice).
    phases = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("phase ")]
    assert phases.count("Sync") == 1, phases
    assert len(phases) == len(set(phases)), phases
    assert phases.index("Copy") < phases.index("Sync") < phases.index("Cutover"), phases
