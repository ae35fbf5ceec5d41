"""Slow the writes to an async-durable target down before its durability lag makes it refuse them.

An ElastiCache cluster with ``Durability=async`` acknowledges a write before the Multi-AZ transaction
log holds it; CloudWatch's ``DurabilityLag`` (AWS/ElastiCache, milliseconds) is the age of the oldest
such write, and as it approaches 10 s the primary refuses new writes (AWS ElastiCache developer guide,
"Durability > Monitoring"). The copy and the syncer write to the target through one pool of movers
whose per-primary byte buckets (ratelimit.TokenBucket) this governor turns down as the lag rises and
back up as it falls, so the migration slows down instead of bouncing off the limit.

The lag comes from a reader the provider supplies (providers/aws.py reads CloudWatch): the engine
imports no AWS library. The reader is synchronous (boto3) and runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from . import logs
from .ratelimit import TokenBucket

LagReader = Callable[[], float | None]   # seconds of DurabilityLag, None when nothing was reported

REFUSED_AT = 10.0        # AWS: the primary refuses writes as the lag approaches this
SLOW_FROM = 2.0          # below this lag, the full rate
FLOOR_AT = 6.0           # at and above this lag, the floor rate: 4 s of margin to the refusal
FLOOR_SHARE = 0.02       # the floor, as a share of the full rate (never zero: the syncer must progress)
RISE_FACTOR = 1.5        # at most this much faster per reading: CloudWatch reports per minute, late
READ_INTERVAL = 30.0     # seconds between readings

log = logs.get("durablecache.laggovernor")


def rate_for_lag(full: float, current: float, lag: float | None) -> float:
    """The next rate: down at once to what the lag allows, up by at most RISE_FACTOR per reading."""
    if lag is None:
        return current
    room = (FLOOR_AT - lag) / (FLOOR_AT - SLOW_FROM)
    allowed = full * min(1.0, max(FLOOR_SHARE, room))
    if allowed <= current:
        return allowed
    return min(allowed, current * RISE_FACTOR)


@dataclasses.dataclass
class LagReading:
    lag_s: float | None = None
    rate: float = 0.0


class LagGovernor:
    """Reads the lag every ``interval`` seconds and sets every bucket's rate (bytes/s per primary)."""

    def __init__(self, read: LagReader, buckets: Sequence[TokenBucket], full_rate: float,
                 emit: Callable[[dict[str, Any]], None] | None = None, interval: float = READ_INTERVAL):
        self.read = read
        self.buckets = list(buckets)
        self.full_rate = full_rate
        self.emit = emit or (lambda _e: None)
        self.interval = interval
        self.now = LagReading(rate=full_rate)
        self.stopped = asyncio.Event()

    async def step(self) -> LagReading:
        """One reading and the rate it leads to. A failed reading keeps the rate (and says so): the
        metric is advice, and a migration must not stop because CloudWatch did not answer once."""
        try:
            lag = await asyncio.to_thread(self.read)
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("durability lag not read; keeping the rate", error=str(exc)[:200])
            return self.now
        rate = rate_for_lag(self.full_rate, self.now.rate, lag)
        if rate != self.now.rate or lag != self.now.lag_s:
            for bucket in self.buckets:
                bucket.set_rate(rate)
            self.emit({"event": "durability_lag", "lag_s": lag, "rate_bytes_per_s": round(rate),
                       "full_rate_bytes_per_s": round(self.full_rate)})
            if lag is not None and lag >= SLOW_FROM:
                log.info("target durability lag: writing slower", lag_s=lag, rate_bytes_per_s=round(rate))
        self.now = LagReading(lag, rate)
        return self.now

    async def run(self) -> None:
        """Until stop(): bounded by the migration's life, and woken at once by stop()."""
        while not self.stopped.is_set():
            await self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), self.interval)

    def stop(self) -> None:
        self.stopped.set()

    def status(self) -> dict[str, Any]:
        return {"seconds": self.now.lag_s, "rateBytesPerSecond": round(self.now.rate),
                "fullRateBytesPerSecond": round(self.full_rate)}


class LagControl:
    """The migration's one governor at a time: over the pool that writes to the target (the copy and the
    forward syncer); none while the pool writes to the source (after FLIP the applications write to the
    target directly, and only the reverse syncer's writes to the source go through our buckets)."""

    def __init__(self, read: LagReader | None, emit: Callable[[dict[str, Any]], None],
                 interval: float = READ_INTERVAL):
        self.read = read
        self.emit = emit
        self.interval = interval
        self.governor: LagGovernor | None = None
        self._task: asyncio.Task[None] | None = None

    def follow(self, pool: Any, writes_target: bool) -> None:
        """Called with every new mover pool (migration._pool); needs a running event loop."""
        if self.read is None:
            return
        previous = self.governor
        self._stop()
        buckets: list[TokenBucket] = list(pool.target_buckets)
        if not writes_target or not buckets or not buckets[0].rate:
            return
        self.governor = LagGovernor(self.read, buckets, float(buckets[0].rate), self.emit, self.interval)
        if previous is not None:   # a new pool keeps the rate the lag allowed the old one
            self.governor.now = previous.now
            for bucket in buckets:
                bucket.set_rate(previous.now.rate)
        self._task = asyncio.get_running_loop().create_task(self.governor.run())

    def _stop(self) -> None:
        if self.governor is not None:
            self.governor.stop()
        self.governor = None

    def status(self) -> dict[str, Any] | None:
        return self.governor.status() if self.governor else None

    async def close(self) -> None:
        self._stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
