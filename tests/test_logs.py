"""Logging never breaks the engine: lines go to whatever sys.stderr is when they are written."""

from __future__ import annotations

import io
import sys

import pytest

from durablecache import logs


def test_a_closed_stream_from_before_does_not_make_logging_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logs.configure(level="info")
    first.close()                               # e.g. a test harness's capture, or a redirected daemon
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    logs.get("durablecache.test").warning("still here", token="s3cret")
    line = now.getvalue()
    assert "still here" in line and "s3cret" not in line
