"""A small asyncio TCP fault proxy, loopback only, placed between DurableCache and one server.

It runs its own event loop in a daemon thread, so synchronous test code drives it:

    fp = FaultProxy(upstream_port).start()      # listens on 127.0.0.1:fp.port
    fp.cut(3.0)                                 # close every connection, refuse new ones for 3 s
    fp.set_latency(0.05)                        # 50 ms added to every chunk, both directions
    fp.drop_mid_reply()                         # the next reply chunk from the server is cut in half
    fp.stop()

No toxiproxy (a Go build) needed; what it does is just enough for the fault matrix.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

LOOPBACK = "127.0.0.1"


class FaultProxy:
    def __init__(self, upstream_port: int, *, listen_port: int = 0):
        self.upstream_port = upstream_port
        self.port = listen_port
        self.latency = 0.0
        self._refuse_until = 0.0
        self._drop_next_reply = False
        self.dropped_replies = 0
        self.cuts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()

    # -- control (called from any thread) ---------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            fut.result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(10)

    def cut(self, seconds: float) -> None:
        """Close every open connection now and refuse new ones for ``seconds``."""
        self._refuse_until = time.monotonic() + seconds
        self.cuts += 1
        self._call(self._close_all)

    def set_latency(self, seconds: float) -> None:
        self.latency = seconds

    def drop_mid_reply(self) -> None:
        """The next chunk the server sends back is forwarded half-way, then that connection is closed."""
        self._drop_next_reply = True

    @property
    def refusing(self) -> bool:
        return time.monotonic() < self._refuse_until

    # -- the loop ---------------------------------------------------------------------------------
    def _call(self, fn: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn)  # type: ignore[arg-type]

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, LOOPBACK, self.port, reuse_address=True))
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server:
            self._server.close()
        self._close_all()
        await asyncio.sleep(0)

    def _close_all(self) -> None:
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                transport = w.transport
                if transport is not None:
                    transport.abort()  # RST, like a cut cable seen from the host
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, self.upstream_port), 5)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer, replies=False),
                                 self._pipe(up_reader, writer, replies=True))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                with contextlib.suppress(Exception):
                    w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.latency:
                    await asyncio.sleep(self.latency)
                if replies and self._drop_next_reply and len(data) > 1:
                    self._drop_next_reply = False
                    self.dropped_replies += 1
                    writer.write(data[: len(data) // 2])
                    with contextlib.suppress(Exception):
                        await writer.drain()
                    break
                if self.refusing:
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()
