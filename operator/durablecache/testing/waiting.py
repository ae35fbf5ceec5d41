"""Bounded waiting for the tests, the fault matrix and the benchmarks: one way to wait for a condition,
so that every wait has a bound and every failure says what was awaited and what was seen last."""

from __future__ import annotations

import asyncio
import inspect
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..ports import LOOPBACK

T = TypeVar("T")


# The first polls come quickly (most conditions hold within milliseconds), later ones every
# ``interval`` seconds (POLL_MAX unless the caller needs to see the moment more closely), so a long
# wait on an API server or a busy process does not load it.
POLL_FIRST = 0.01
POLL_MAX = 0.25


def wait_for(what: str, probe: Callable[[], T], timeout: float, *, interval: float = POLL_MAX,
             ignore: tuple[type[BaseException], ...] = (), describe: Callable[[], object] | None = None) -> T:
    """``probe()``'s first truthy value; AssertionError naming ``what`` and the last value seen once
    ``timeout`` seconds have passed (or what ``describe()`` says then, where a yes/no probe's last
    value would tell nothing). An exception of a type in ``ignore`` counts as "not yet" (a server
    still starting) and is the last value seen."""
    polls = _Polls(what, timeout, interval, describe)
    while True:
        try:
            value = probe()
        except ignore as exc:
            time.sleep(polls.pause_after(exc))
            continue
        if value:
            return value
        time.sleep(polls.pause_after(value))


async def wait_for_async(what: str, probe: Callable[[], T | Awaitable[T]], timeout: float, *,
                         interval: float = POLL_MAX, ignore: tuple[type[BaseException], ...] = (),
                         describe: Callable[[], object] | None = None) -> T:
    """``wait_for`` inside an event loop: the probe runs on the loop between sleeps, so it may read
    state the loop's tasks change; a probe that returns an awaitable is awaited."""
    polls = _Polls(what, timeout, interval, describe)
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
        except ignore as exc:
            await asyncio.sleep(polls.pause_after(exc))
            continue
        if value:
            return value  # type: ignore[return-value]
        await asyncio.sleep(polls.pause_after(value))


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float, *, host: str = LOOPBACK) -> None:
    """Until something accepts connections on ``host:port``; AssertionError at once if ``proc`` exits
    first (its exit code named), or after ``timeout``."""

    def accepting() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the process for port {port} exited with {proc.returncode} before listening")
        with socket.create_connection((host, port), 0.2):
            return True

    wait_for(f"something to listen on {host}:{port}", accepting, timeout, ignore=(OSError,))


def wait_answering(url: str, proc: subprocess.Popen[Any], timeout: float, *, context: ssl.SSLContext | None = None,
                   describe: Callable[[], object] | None = None) -> None:
    """Until an HTTP GET of ``url`` answers 200; AssertionError at once if ``proc`` exits first, or after
    ``timeout`` (both say what ``describe()`` says then: a log's tail)."""

    def answering() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the process serving {url} exited with {proc.returncode}: "
                                 f"{describe() if describe else ''}")
        with urllib.request.urlopen(url, timeout=5, context=context) as rsp:
            return bool(rsp.status == 200)

    wait_for(f"{url} to answer", answering, timeout, ignore=(OSError,), describe=describe)


class _Polls:
    """The bound and the pauses of one wait: quick at first, then every ``interval`` seconds."""

    def __init__(self, what: str, timeout: float, interval: float, describe: Callable[[], object] | None):
        self.what, self.timeout, self.interval, self.describe = what, timeout, interval, describe
        self.deadline = time.monotonic() + timeout
        self.pause = min(POLL_FIRST, interval)

    def pause_after(self, last: object) -> float:
        """How long to pause after a probe that gave the falsy value (or raised the ignored exception)
        ``last``; AssertionError instead once the deadline has passed."""
        if time.monotonic() >= self.deadline:
            seen = self.describe() if self.describe else last
            raise AssertionError(f"timed out after {self.timeout:g} s waiting for {self.what} (last seen: {seen!r})")
        pause, self.pause = self.pause, min(self.pause * 2, self.interval)
        return pause
