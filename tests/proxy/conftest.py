"""A proxy running on its own event loop in a background thread, so synchronous clients (valkey-py)
and async ones (GLIDE) can talk to it from the test while the test drives FREEZE/FLIP/UNFREEZE."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from durablecache.proxy import Proxy
from durablecache.urls import Endpoint


class ProxyRunner:
    def __init__(self, upstream: Endpoint, **kwargs: Any):
        self.marks: list[tuple[int, bytes]] = []
        self.mark_delay = 0.0
        # uvloop: the loop `durablecache proxy` and `migrate` run on.
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def on_marks(db: int, keys: list[bytes]) -> None:
            if self.mark_delay:
                await asyncio.sleep(self.mark_delay)
            self.marks.extend((db, k) for k in keys)
        kwargs.setdefault("on_marks", on_marks)
        self.proxy = self.run(self._make(upstream, kwargs))
        self.run(self.proxy.start())
        self.port = self.proxy.port

    @staticmethod
    async def _make(upstream: Endpoint, kwargs: dict[str, Any]) -> Proxy:
        return Proxy(upstream, **kwargs)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return fn()
        return self.run(wrapper())

    def keys(self, db: int | None = None) -> set[bytes]:
        return {k for d, k in list(self.marks) if db is None or d == db}

    def clear(self) -> None:
        self.marks.clear()

    def stop(self) -> None:
        try:
            self.run(self.proxy.stop(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., ProxyRunner]]:
    started: list[ProxyRunner] = []

    def make(upstream: Endpoint, **kwargs: Any) -> ProxyRunner:
        runner = ProxyRunner(upstream, **kwargs)
        started.append(runner)
        return runner

    yield make
    for r in started:
        r.stop()
