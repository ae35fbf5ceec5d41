"""Token buckets: protect a production source (ops/s) and a durable target (bytes/s per primary)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """``await take(n)`` returns once n tokens are available; rate None means unlimited."""

    def __init__(self, rate: float | None, burst_seconds: float = 0.25):
        self.rate = rate
        self.capacity = (rate or 0) * burst_seconds
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: float) -> None:
        if not self.rate:
            return
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                # Sleep off the debt; a request larger than the burst simply waits longer.
                await asyncio.sleep(-self._tokens / self.rate)
