"""Marks from proxy processes to the syncer's process, over a small RESP protocol.

    proxy -> syncer   HELLO-MARKS <token> <proxy-name>    <- +OK   (or -ERR and the connection closes)
                      MARK <db> <key> [<key> ...]         <- +OK   (after the syncer's callback returned)
                      BYE                                 <- +OK   (a clean goodbye)

``RemoteMarks.__call__`` returns only after the syncer acknowledged the batch, so "marks delivered"
means the syncer has them. A connection that ends without BYE makes the server call ``on_lost(peer)``:
marks may have been lost, and the syncer must force a full verify-and-repair before any cutover.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import libvalkey

from .. import logs
from ..errors import ConnectError

log = logs.get("durablecache.marks")
# Takes the keys of completed writes. Either synchronous (returns None once it has them: the
# in-process syncer; the proxy delivers to it without a coroutine or a task) or a coroutine function
# (awaited: RemoteMarks). Synchronous callbacks that return anything else are treated as failures.
MarkCallback = Callable[[int, list[bytes]], Awaitable[None] | None]
Acked = Callable[[BaseException | None], None]   # RemoteMarks.submit: None once acknowledged, or why not
LostCallback = Callable[[str], Any]
READ_CHUNK = 1 << 16


class MarkServer:
    """Syncer side: accepts proxies, calls ``on_marks`` per batch in arrival order, acks each."""

    def __init__(self, on_marks: MarkCallback, token: str, *, host: str = "127.0.0.1", port: int = 0,
                 on_lost: LostCallback | None = None):
        self.on_marks = on_marks
        self.on_lost = on_lost
        self.host = host
        self.port = port
        self._token = token.encode()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reports: set[asyncio.Future[Any]] = set()   # on_lost calls that returned an awaitable
        self.peers: dict[str, int] = {}      # connected proxies -> batches received
        self.batches = 0
        self.keys = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        server: Any = self._server     # as in Proxy.start: uvloop's sockets are a list, not a tuple
        self.port = int(server.sockets[0].getsockname()[1])
        log.info("marks.listening", address=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                await asyncio.wait_for(t, 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        addr = writer.get_extra_info("peername")
        peer = f"{addr[0]}:{addr[1]}" if addr else "?"
        parser = libvalkey.Reader()
        authed = False
        clean = False
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                parser.feed(data)
                acks: list[bytes] = []
                while (cmd := parser.gets()) is not False:
                    verb = cmd[0].upper() if isinstance(cmd, list) and cmd else b""
                    if not authed:
                        if verb == b"HELLO-MARKS" and len(cmd) >= 2 and hmac.compare_digest(cmd[1], self._token):
                            authed = True
                            if len(cmd) > 2:
                                peer = f"{cmd[2].decode(errors='replace')}@{peer}"
                            self.peers[peer] = 0
                            acks.append(b"+OK\r\n")
                            log.info("marks.peer_connected", peer=peer)
                            continue
                        writer.write(b"-ERR durablecache marks: bad token\r\n")
                        await writer.drain()
                        return
                    if verb == b"MARK" and len(cmd) >= 2:
                        taken = self.on_marks(int(cmd[1]), cmd[2:])
                        if taken is not None:
                            await taken
                        self.batches += 1
                        self.keys += len(cmd) - 2
                        self.peers[peer] = self.peers.get(peer, 0) + 1
                        acks.append(b"+OK\r\n")
                    elif verb == b"BYE":
                        clean = True
                        writer.write(b"".join(acks) + b"+OK\r\n")
                        await writer.drain()
                        return
                    elif verb == b"PING":
                        acks.append(b"+PONG\r\n")
                    else:
                        acks.append(b"-ERR durablecache marks: unknown command\r\n")
                if acks:
                    writer.write(b"".join(acks))
                    await writer.drain()
        except (OSError, libvalkey.ProtocolError, ValueError):
            pass
        finally:
            # No await in here: compiled (mypyc), an await in a finally block leaves the pending
            # exception (a cancellation) set as the thread's handled exception, where later code finds it.
            self._tasks.discard(task)
            self.peers.pop(peer, None)
            writer.close()
            if authed and not clean:
                log.warning("marks.peer_lost", peer=peer)
                self._report_lost(peer)

    def _report_lost(self, peer: str) -> None:
        if self.on_lost is None:
            return
        result = self.on_lost(peer)
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)


class RemoteMarks:
    """Proxy side: a MarkCallback that ships each batch to a MarkServer and awaits its ack.

    If the connection drops, it reconnects (for up to ``retry_for`` seconds) and re-sends every batch
    not yet acknowledged — the server saw the drop and already called ``on_lost``, so a batch that
    arrives twice does no harm. Past that bound the call raises ConnectError: the proxy then closes
    the client connection instead of acknowledging a write whose marks are not delivered.
    """

    def __init__(self, host: str, port: int, token: str, *, name: str = "durablecache-proxy",
                 retry_for: float = 10.0):
        self.host = host
        self.port = port
        self._token = token
        self.name = name
        self.retry_for = retry_for
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        # Frames sent (or to re-send) and not acknowledged yet; the last frame of a batch carries the
        # callbacks of everyone whose marks it holds.
        self._unacked: deque[tuple[bytes, list[Acked] | None]] = deque()
        self._batch: dict[int, list[bytes]] | None = None
        self._batch_acked: list[Acked] = []
        self._lock = asyncio.Lock()
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self) -> None:
        async with self._lock:
            await self._connect_locked()

    async def _connect_locked(self) -> None:
        if self._writer is not None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        delay = 0.05
        while True:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5.0)
                break
            except (TimeoutError, OSError) as exc:
                if loop.time() + delay > deadline:
                    raise ConnectError(f"cannot reach the syncer at {self.host}:{self.port}: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        writer.write(libvalkey.pack_command((b"HELLO-MARKS", self._token.encode(), self.name.encode())))
        parser = libvalkey.Reader()
        while (reply := parser.gets()) is False:
            data = await asyncio.wait_for(reader.read(READ_CHUNK), 5.0)
            if not data:
                raise ConnectError(f"the syncer at {self.host}:{self.port} closed the connection")
            parser.feed(data)
        if isinstance(reply, libvalkey.ReplyError):
            writer.close()
            raise ConnectError(f"the syncer at {self.host}:{self.port} refused us: {reply}")
        self._writer = writer
        for frame, _ in self._unacked:       # re-send what the old connection did not ack
            writer.write(frame)
        self._reader_task = loop.create_task(self._read_acks(reader, parser))

    async def _read_acks(self, reader: asyncio.StreamReader, parser: Any) -> None:
        try:
            while True:
                while (reply := parser.gets()) is not False:
                    if not self._unacked:
                        continue
                    _, acked = self._unacked.popleft()
                    if acked is None:     # not the last frame of its batch: the last one's ack counts
                        continue
                    failed = ConnectError(f"syncer rejected marks: {reply}") \
                        if isinstance(reply, libvalkey.ReplyError) else None
                    _notify(acked, failed)
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                parser.feed(data)
        except OSError:
            pass
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        if self._unacked and not self._closing:
            self._reconnect_later()

    def _reconnect_later(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reconnect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconnect(self) -> None:
        try:
            async with self._lock:
                await self._connect_locked()
        except ConnectError as exc:
            while self._unacked:
                _, acked = self._unacked.popleft()
                _notify(acked or [], exc)

    async def __call__(self, db: int, keys: list[bytes]) -> None:
        if self._writer is None:
            async with self._lock:
                await self._connect_locked()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit({db: keys}, _settles(fut))
        await fut

    def submit(self, batch: dict[int, list[bytes]], acked: Acked) -> None:
        """Send marks (db -> keys) without a coroutine (the proxy's hot path): ``acked(None)`` once the
        syncer acknowledged them, ``acked(error)`` when ``__call__`` would raise. Marks submitted in the
        same loop iteration share one send and one ack round."""
        if self._batch is None:
            self._batch = {}
            asyncio.get_running_loop().call_soon(self._send_batch)
            if self._writer is None and not self._lock.locked() and not self._closing:
                self._reconnect_later()   # the batch is re-sent once connected (or fails)
        for db, keys in batch.items():
            pending = self._batch.get(db)
            if pending is None:
                self._batch[db] = list(keys)
            else:
                pending.extend(keys)
        self._batch_acked.append(acked)

    def _send_batch(self) -> None:
        batch, acked = self._batch, self._batch_acked
        self._batch, self._batch_acked = None, []
        if not batch:
            _notify(acked, None)
            return
        items = list(batch.items())
        frames = []
        for i, (db, keys) in enumerate(items):
            frame = libvalkey.pack_command((b"MARK", db, *keys))
            frames.append(frame)
            self._unacked.append((frame, acked if i == len(items) - 1 else None))
        if self._writer is not None:
            self._writer.write(b"".join(frames))

    async def close(self) -> None:
        """Say goodbye cleanly (the syncer then knows no marks were lost) and close."""
        self._closing = True
        writer = self._writer
        if writer is not None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._unacked.append((b"", [_settles(fut)]))
            writer.write(libvalkey.pack_command((b"BYE",)))
            with contextlib.suppress(TimeoutError, ConnectError):
                await asyncio.wait_for(fut, 5.0)
            writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._writer = None


def _settles(fut: asyncio.Future[None]) -> Acked:
    """An Acked callback that completes ``fut`` (the awaitable API on top of ``submit``)."""
    def acked(failed: BaseException | None) -> None:
        if fut.done():
            return
        if failed is None:
            fut.set_result(None)
        else:
            fut.set_exception(failed)
    return acked


def _notify(acked: list[Acked], failed: BaseException | None) -> None:
    """Tell everyone waiting on a batch; one failing callback must not stop the acks of the others."""
    for done in acked:
        try:
            done(failed)
        except Exception:  # noqa: BLE001
            log.exception("marks.ack_callback_failed")
