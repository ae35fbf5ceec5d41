"""Several proxy processes on one port: ``durablecache proxy --processes N``.

One Python process uses one core. N ``durablecache proxy`` children each listen on the same address
with SO_REUSEPORT (the kernel spreads new connections over their sockets), each with its own admin port
and its own mark stream to the syncer, so a coordinator drives them as a list of proxies, like any
other. This parent only starts them, restarts one that dies and passes SIGTERM/SIGINT on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

from . import logs
from .errors import ConnectError

log = logs.get("durablecache.proxy.processes")
START_TIMEOUT: Final = 30.0     # a child prints its "listening" line within this
STOP_TIMEOUT: Final = 15.0      # after SIGTERM, before SIGKILL
FIRST_BACKOFF: Final = 0.2      # a child that died is started again after this, doubling ...
MAX_BACKOFF: Final = 10.0       # ... up to this while it keeps dying young
STABLE_AFTER: Final = 10.0      # a child that ran this long starts the back-off afresh when it dies
LISTENING: Final = b"listening on"


def cpu_count() -> int:
    """The CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not Linux
        return os.cpu_count() or 1


class Child:
    """One proxy process: its arguments, the running process, how often it was restarted."""

    def __init__(self, index: int, argv: Sequence[str], env: dict[str, str]):
        self.index = index
        self.argv = list(argv)
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.backoff = FIRST_BACKOFF
        self.restarts = 0
        self.announced = ""

    async def start(self) -> None:
        """Start the process and wait (bounded) until it says it listens."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "durablecache.cli", *self.argv, stdout=asyncio.subprocess.PIPE, env=self.env)
        self.started = time.monotonic()
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        if LISTENING not in line:
            await self.stop()
            raise ConnectError(f"proxy process {self.index} did not start (exit code {self.proc.returncode}); "
                               "its error is above")
        self.announced = line.decode(errors="replace").strip()

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def next_delay(self) -> float:
        """How long to wait before starting it again: back off while it keeps dying young."""
        if time.monotonic() - self.started >= STABLE_AFTER:
            self.backoff = FIRST_BACKOFF
        delay, self.backoff = self.backoff, min(self.backoff * 2, MAX_BACKOFF)
        return delay


async def supervise(children: Sequence[Child], stop: asyncio.Event) -> int:
    """Start every child, restart one that dies, stop them all when ``stop`` is set. A child that does
    not start the first time stops everything (a bad flag or an unreachable upstream fails at once)."""
    try:
        for child in children:
            await child.start()
            print(f"durablecache proxy: process {child.index}: {child.announced}", flush=True)
    except BaseException:
        await asyncio.gather(*(c.stop() for c in children))
        raise
    waits: dict[asyncio.Future[int], Child] = {asyncio.ensure_future(c.wait()): c for c in children}
    stopping: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            pending: list[asyncio.Future[Any]] = [stopping, *waits]
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in [t for t in waits if t.done()]:
                if stop.is_set():
                    break
                child = waits.pop(task)
                waits[asyncio.ensure_future(_revive(child, task.result(), stop))] = child
    finally:
        stopping.cancel()
        for task in waits:
            task.cancel()
        await asyncio.gather(*(c.stop() for c in children))
    return 0


async def _revive(child: Child, code: int, stop: asyncio.Event) -> int:
    """A child ended with ``code``: start it again after its back-off; return when it ends again
    (or at once when it did not start: the caller revives it again, backing off further)."""
    delay = child.next_delay()
    child.restarts += 1
    log.warning("proxy.process_died", process=child.index, exit_code=code, restarts=child.restarts,
                restart_in_s=delay)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)      # the back-off, cut short by a stop
    if stop.is_set():
        return code
    try:
        await child.start()
    except ConnectError as exc:
        log.error("proxy.process_restart_failed", process=child.index, error=str(exc))
        return -1
    log.info("proxy.process_restarted", process=child.index, pid=child.proc.pid if child.proc else None)
    return await child.wait()
