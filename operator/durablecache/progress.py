"""Progress of long work: a rich progress bar on a terminal, JSON lines with --json, silence otherwise."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    def start(self, total_keys: int) -> None: ...

    def advance(self, keys: int, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, total_keys: int) -> None:
        pass

    def advance(self, keys: int, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


class JsonProgress:
    """One ``{"event":"progress",...}`` object at most every ``interval`` seconds, as a JSON line on
    ``out`` or handed to ``sink``."""

    def __init__(self, out: TextIO = sys.stdout, interval: float = 1.0,
                 sink: Callable[[dict[str, Any]], None] | None = None):
        self.out = out
        self.sink = sink or (lambda fields: emit_json(self.out, **fields))
        self.interval = interval
        self.total = self.keys = self.bytes = 0
        self._t0 = self._last = 0.0

    def start(self, total_keys: int) -> None:
        self.total = total_keys
        self._t0 = self._last = time.monotonic()

    def advance(self, keys: int, nbytes: int) -> None:
        self.keys += keys
        self.bytes += nbytes
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.emit(now)

    def emit(self, now: float) -> None:
        elapsed = max(now - self._t0, 1e-9)
        rate = self.keys / elapsed
        eta = (self.total - self.keys) / rate if rate and self.total > self.keys else 0.0
        self.sink({"event": "progress", "keys": self.keys, "total": self.total, "bytes": self.bytes,
                   "keys_per_s": round(rate, 1), "eta_s": round(eta, 1)})

    def finish(self) -> None:
        self.emit(time.monotonic())


class BarProgress:
    """A rich progress bar: keys, MB, keys/s and ETA from the source's key count."""

    def __init__(self, description: str = "copying"):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bytes = 0
        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("keys"), TextColumn("{task.fields[mb]:.1f} MB"),
                             TextColumn("{task.fields[rate]:,.0f} keys/s"), TimeElapsedColumn(),
                             TextColumn("ETA"), TimeRemainingColumn(), transient=False, console=Console(stderr=True))
        self._task = self._bar.add_task(description, total=None, mb=0.0, rate=0.0)
        self._t0 = time.monotonic()
        self._keys = 0

    def start(self, total_keys: int) -> None:
        self._bar.update(self._task, total=total_keys or None)
        self._bar.start()
        self._t0 = time.monotonic()

    def advance(self, keys: int, nbytes: int) -> None:
        self._keys += keys
        self._bytes += nbytes
        rate = self._keys / max(time.monotonic() - self._t0, 1e-9)
        self._bar.update(self._task, advance=keys, mb=self._bytes / 1e6, rate=rate)

    def finish(self) -> None:
        self._bar.stop()


def emit_json(out: TextIO, **fields: Any) -> None:
    out.write(json.dumps(fields, separators=(",", ":")) + "\n")
    out.flush()


def choose(json_lines: bool, description: str = "copying") -> Progress:
    if json_lines:
        return JsonProgress()
    if sys.stderr.isatty():
        return BarProgress(description)
    return NoProgress()
