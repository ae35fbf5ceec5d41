"""Token buckets: protect a production source (ops/s) and a durable target (bytes/s per primary)."""

from __future__ import annotations

import asyncio
import time

DEBT_SLICE = 0.1   # seconds: how soon a new rate reaches a request already waiting


class TokenBucket:
    """``await take(n)`` returns once n tokens are available; rate None means unlimited."""

    def __init__(self, rate: float | None, burst_seconds: float = 0.25):
        self.rate = rate
        self.burst_seconds = burst_seconds
        self.capacity = (rate or 0) * burst_seconds
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: float) -> None:
        if not self.rate:
            return
        async with self._lock:
            self._refill()
            self._tokens -= n
            while self._tokens < 0 and self.rate:
                # Sleep off the debt (a request larger than the burst simply waits longer), in slices:
                # a rate changed meanwhile (set_rate) applies to the rest of it.
                await asyncio.sleep(min(-self._tokens / self.rate, DEBT_SLICE))
                self._refill()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * (self.rate or 0))
        self._stamp = now

    def set_rate(self, rate: float) -> None:
        """A new rate from now on (laggovernor.py); tokens saved up beyond the new burst are dropped,
        so a slowdown takes effect at once."""
        self._refill()     # the time until now at the old rate
        self.rate = rate
        self.capacity = rate * self.burst_seconds
        self._tokens = min(self._tokens, self.capacity)
