"""A pytest plugin for valkey-py's suite run through a migrating proxy (tests/conformance/run.py).

The suite empties its database after every test with FLUSHDB, which the proxy refuses during a
migration (its effect cannot be tracked key by key). Only that teardown call is replaced: the keys of
the client's database are deleted one by one (SCAN + UNLINK), which the proxy marks like any write.
A FLUSHDB that a test itself sends still reaches the proxy and is refused, as an application's would.
"""

from __future__ import annotations

import sys

import valkey.client

_flushdb = valkey.client.Valkey.flushdb


def _flushdb_or_delete(self, *args, **kwargs):
    caller = sys._getframe(1).f_code
    if caller.co_name == "teardown" and caller.co_filename.endswith("conftest.py"):
        for _ in range(1000):   # bounded: a test that keeps writing cannot hold the teardown forever
            keys = list(self.scan_iter(count=1000))
            if not keys:
                return True
            for i in range(0, len(keys), 500):
                self.unlink(*keys[i:i + 500])
        return True
    return _flushdb(self, *args, **kwargs)


valkey.client.Valkey.flushdb = _flushdb_or_delete
