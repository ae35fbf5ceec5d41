"""THE TEST STAND-IN FOR ELASTICACHE'S SNAPSHOT AND RESTORE (snapshot seeding, docs/aws.md). No real part
can run here: moto records CreateSnapshot and CreateReplicationGroup(SnapshotName=...) but holds no data.
So a test takes the "snapshot" itself — the source's RDB file, written by SAVE at one point in time, as
an ElastiCache snapshot is — and "restores" it by restarting the local server the restored group maps to
from that file. Test code only; the operator and the engine never call this."""

from __future__ import annotations

import time
from pathlib import Path

from durablecache.testing.localvalkey import LocalServer, stop_process

RESTART_ATTEMPTS = 50


def snapshot(source: LocalServer) -> bytes:
    """The source's data as of now, as an RDB file."""
    source.admin("SAVE")
    return Path(source.dir, "dump.rdb").read_bytes()


def restore(rdb: bytes, target: LocalServer) -> None:
    """The target server stopped and started again on its port from the snapshot's RDB file (it loads
    dump.rdb from its directory at start), as a cluster restored from a snapshot starts with its data."""
    assert target.proc is not None
    stop_process(target.proc, 5)
    Path(target.dir, "dump.rdb").write_bytes(rdb)
    for _attempt in range(RESTART_ATTEMPTS):   # a just-closed port may stay busy for a moment
        if target._launch():                   # noqa: SLF001 - the harness's own start, on the same port
            return
        time.sleep(0.1)
    raise RuntimeError(f"the restored server did not start on port {target.port}")
