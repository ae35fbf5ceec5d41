"""Keep Python's cyclic garbage collector out of the cutover's write pause.

With thousands of client sessions a process holds millions of tracked objects, and one full
collection of them takes tens to hundreds of milliseconds (measured: up to 225 ms at 5,000 idle
connections, bench/cutover_conns.py). Landing inside FREEZE..UNFREEZE, that alone would pass the
pause bound. So the collector is off from FREEZE until UNFREEZE: a few milliseconds in which, writes
being held, little is allocated. It is turned on again at the latest after ``limit`` seconds, so a
coordinator that vanishes mid-freeze cannot leave it off for good. Deferred, not skipped: the
collection runs after the pause, while writes flow again.
"""

from __future__ import annotations

import asyncio
import gc


class GcHold:
    """One owner's hold on the collector (the proxy's freeze, the coordinator's switch). Holds nest
    across owners in one process: only the owner that found the collector on turns it on again."""

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self._reenable = False

    def start(self, limit: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        else:
            self._reenable = gc.isenabled()
            gc.disable()
        self._timer = asyncio.get_running_loop().call_later(limit, self.end)

    def end(self) -> None:
        if self._timer is None:
            return
        self._timer.cancel()
        self._timer = None
        if self._reenable:
            gc.enable()
