"""A session's reply order toward its client: replies written in request order, each batch only after
the marks of the writes in it were handed over (``kick``, ``marks_done``), and how a session ends
without losing a mark (``upstream_lost``, the client leaving with writes in flight)."""

from __future__ import annotations

import asyncio
from typing import Any, Final

from .. import logs
from .replies import Entry, Replies
from .state import ProxyState
from .upstream import SessionBase, Upstream

log = logs.get("durablecache.proxy")

CLIENT_GONE_GRACE: Final = 2.0        # how long replies to in-flight writes are awaited after a client left
CLIENT_GONE_MAX: Final = 30.0         # ... and at most, while a non-blocking write (a long script) is unanswered


class Outbox(SessionBase):
    """The reply side of a client session (session.Session is the request side)."""

    def __init__(self, proxy: ProxyState[Any], sid: int):
        self.proxy = proxy
        self.id = sid
        self.router = proxy.router
        self.transport: asyncio.Transport | None = None
        self.pending = Replies()
        self.out = []
        self.batch: dict[int, list[bytes]] = {}
        self.batch_writes = 0
        self.marking = False
        self.delivering: dict[int, list[bytes]] | None = None   # the batch whose marks are in delivery
        self.dirty: list[Upstream] = []     # connections with commands to send (queue_out)
        self.conns: dict[int, Upstream] = {}
        self.inflight = 0                   # writes sent whose marks are not delivered yet
        self.closed = False
        self.client_gone = False
        self.resp3 = False
        self.db = 0                         # db in effect at the reply position (marks use it)

    def pause_client_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_client_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def queue_out(self, conn: Upstream) -> None:
        if not conn.queued:
            conn.queued = True
            self.dirty.append(conn)

    def _push_all(self) -> None:
        dirty = self.dirty
        if dirty:
            for c in dirty:
                c.queued = False
                c.push_out()
            dirty.clear()
        self.collect()
        self.kick()

    # ---- replies --------------------------------------------------------------------------------
    def local(self, reply: bytes) -> None:
        e = Entry()
        e.reply = reply
        self.pending.append(e)

    def local_error(self, reply: bytes) -> None:
        self.local(reply)

    def oob(self, frame: bytes) -> None:
        """Out-of-band traffic (pub/sub messages, pushes): after every reply completed before it."""
        self.collect()
        self.out.append(frame)

    def add_marks(self, e: Entry) -> None:
        """A write's reply arrived: its keys join the batch delivered before the reply is written.
        The batch takes the entry's key lists over (the entry is done with them)."""
        db = self.db
        batch = self.batch
        for sel, keys in e.marks or ():
            if sel is not None:
                db = sel
            if keys:
                lst = batch.get(db)
                if lst is None:
                    batch[db] = keys
                else:
                    lst.extend(keys)
        self.batch_writes += e.writes

    def collect(self) -> None:
        """Move completed replies at the head of the queue to ``out``; gather their marks."""
        pending = self.pending
        out = self.out
        while pending:
            e = pending[0]
            if e.reply is None:
                if e.fn is None:
                    break
                e.reply = e.fn()
            pending.popleft()
            if e.marks is not None:
                self.add_marks(e)
            if e.cb is not None:
                e.cb(e)
            out.append(e.reply)

    def kick(self) -> None:
        """Write what is ready to the client — after the marks of the writes in it were handed over."""
        if self.marking:
            return
        if self.batch_writes:
            batch, writes = self.batch, self.batch_writes
            self.batch, self.batch_writes = {}, 0
            settled = self.proxy.delivery.marks_now(batch, writes)
            if settled is None:       # delivery under way: marks_done writes these replies
                out, self.out = self.out, []
                self.marking = True
                self.delivering = batch
                self.proxy.delivery.submit_marks(self.marks_done, batch, writes, out)
                return
            self.inflight -= writes
            self._settled()
            if not settled:
                self.abort("marks could not be delivered")
                return
        out = self.out
        if out:
            data = b"".join(out)      # one part: that very object, not a copy
            out.clear()
            if self.transport is not None:
                self.transport.write(data)
                self.proxy.bytes_out += len(data)
        if self.client_gone:
            self._maybe_finish()

    def marks_done(self, ok: bool, writes: int, out: list[bytes]) -> None:
        """Called by the proxy once the marks of ``writes`` writes were delivered (or failed)."""
        self.inflight -= writes
        self.marking = False
        self.delivering = None
        self._settled()
        if not ok:
            self.abort("marks could not be delivered")
            return
        if out and self.transport is not None:
            data = b"".join(out)
            self.transport.write(data)
            self.proxy.bytes_out += len(data)
        self.collect()
        self.kick()

    def count_writes(self, writes: int) -> None:
        """``writes`` writes sent: in flight until their marks are delivered (``_settled``)."""
        if writes:
            self.inflight += writes
            self.proxy.writing.add(self)

    def _settled(self) -> None:
        """Writes settled (answered, marks delivered): a FREEZE waiting for them looks again now."""
        if not self.inflight and not self.marking:
            self.proxy.writing.discard(self)
        settled = self.proxy.settled
        if settled is not None:
            settled.set()

    # ---- endings --------------------------------------------------------------------------------
    def upstream_lost(self, conn: Upstream) -> None:
        """The upstream closed (server gone, QUIT): mark every write that may have happened, then close."""
        if self.closed:
            return
        if self.transport is not None and not conn.failed:
            log.info("proxy.upstream_closed", session=self.id)
        self.collect()
        self._mark_unanswered()
        self._close_client_after_flush()

    def _mark_unanswered(self) -> None:
        """Conservative: a write sent without a reply may have been applied; mark its keys."""
        for e in self.pending:
            if e.marks is not None and e.reply is None:
                for sel, keys in e.marks:
                    if keys:
                        self.batch.setdefault(self.db if sel is None else sel, []).extend(keys)
                self.batch_writes += e.writes
                e.marks = None
        self.pending.clear()
        for c in self.conns.values():
            c.expect.clear()

    def _close_client_after_flush(self) -> None:
        self.closed = True
        if self.batch_writes and not self.marking:
            self.kick()
        loop = asyncio.get_running_loop()

        async def finish() -> None:
            for _ in range(200):        # bounded: at most ~10 s for marks in delivery
                if not self.marking and not self.batch_writes:
                    break
                await asyncio.sleep(0.05)
            if self.transport is not None:
                if self.out:
                    self.transport.write(b"".join(self.out))
                    self.out = []
                self.transport.close()
            self._close_conns()
        loop.create_task(finish())

    def abort(self, why: str) -> None:
        log.warning("proxy.session_aborted", session=self.id, reason=why)
        self.out = []
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._close_conns()

    def _maybe_finish(self) -> None:
        if self.client_gone and not self.inflight and not self.marking:
            self._close_conns()

    def _give_up(self, waited: float = CLIENT_GONE_GRACE) -> None:
        if self.conns and (self.inflight or self.marking):
            if waited < CLIENT_GONE_MAX and any(e.marks is not None and e.reply is None and not e.blocking
                                                for e in self.pending):
                # Closing the connection would not stop a running write (a script): it could land
                # after its conservative mark was copied. Keep waiting for its reply (bounded).
                asyncio.get_running_loop().call_later(CLIENT_GONE_GRACE, self._give_up,
                                                      waited + CLIENT_GONE_GRACE)
                return
            self._close_conns()
            self._mark_unanswered()
            self.kick()

    def _close_conns(self) -> None:
        for c in self.conns.values():
            c.close()
        self.conns.clear()
        self.proxy.departed.discard(self)

    def quiet(self) -> bool:
        return not self.pending and not self.marking and not self.batch_writes

