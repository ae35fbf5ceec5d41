"""The coordinator's fleet of joined proxies (docs/ha.md): proxies started elsewhere (`durablecache proxy
--join`) register over the mark channel, receive the current state, and are then driven like the proxies
the coordinator starts itself. To ``Migration`` the whole fleet is one ProxyHandle.

Joining, in one exchange on the proxy's mark connection (proxy/marks.py, proxyjoin.py):

    proxy -> HELLO-FLEET <token> <proxy-id> <highest epoch it has seen>
          <- $<JSON state>: epoch, upstream (the authoritative side), frozen, held keys, prepared target
    (the proxy applies the state, then opens its client port and its admin API)
    proxy -> READY <client-address> <admin-address>
          <- +OK: a member now; its MARK frames follow on the same connection

Between HELLO-FLEET and READY the fleet's lock is held, so no instruction is fanned out meanwhile: the
state a proxy applied is still the state when it becomes a member, and every later instruction reaches
it. A member leaves when its mark connection ends. An instruction that fails on a member that has left
(its connection ended, seen within GONE_WAIT) is not an error; on a member still connected it is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from . import logs
from .errors import FencedError, RefusedError
from .fleettls import FleetTLS
from .migration import MarkCallback
from .proxy.marks import MarkServer
from .proxyhandles import AdminDriven
from .readiness import merge
from .urls import Endpoint

log = logs.get("durablecache.fleet")
READY_TIMEOUT = 15.0     # seconds a joining proxy may take to apply the state (discovery, PREPARE)
JOIN_WAIT = 30.0         # seconds a join waits for an instruction in progress (a hold: max_key_pause)
GONE_WAIT = 1.0          # after a failed instruction: how long to wait for the member's connection to end
Emit = Callable[[dict[str, Any]], None]


class Member(AdminDriven):
    """One joined proxy, driven through its admin API with the fleet's token and epoch."""

    def __init__(self, peer: str, proxy_id: str, client: str, admin: str, token: str, epoch: int,
                 tls: ssl.SSLContext | None = None):
        super().__init__(token, epoch, tls)
        self.peer = peer
        self.proxy_id = proxy_id
        self.address = client
        self.admin_base = f"{self.scheme}://{admin}"
        self.gone = asyncio.Event()
        self._open_session()


class Fleet:
    """The joined proxies, as one ProxyHandle; also the MarkServer's fleet hooks (join/ready/left)."""

    def __init__(self, token: str, *, epoch: int = 0, host: str = "127.0.0.1", port: int = 0,
                 emit: Emit | None = None, tls: FleetTLS | None = None):
        self.token = token
        # TLS on both channels (docs/ha.md, Transport): the mark server asks every proxy for the fleet's
        # certificate, and the members' admin APIs must present it; None: plain TCP.
        self.tls = tls
        self.epoch = epoch
        self.host, self.port = host, port
        self.emit = emit or (lambda _e: None)
        self.address = f"fleet@{host}:{port}"
        self.members: dict[str, Member] = {}
        self.server: MarkServer | None = None
        self._lock = asyncio.Lock()
        self._joining: dict[str, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # The state a joining proxy receives: what every member was last told.
        self.upstream: Endpoint | None = None
        self.frozen = False
        self.prepared: Endpoint | None = None
        self.held: set[tuple[int, bytes]] = set()
        self.ended = False       # the migration is over: members serve as plain front ends (end_migration)


    async def start(self, upstream: Endpoint, on_marks: MarkCallback, on_lost: Callable[[str], Any]) -> None:
        self.upstream = upstream
        self.server = MarkServer(on_marks, self.token, host=self.host, port=self.port,
                                 on_lost=lambda peer: on_lost(f"proxy {peer} lost its mark stream"), fleet=self,
                                 tls=self.tls.server if self.tls else None)
        await self.server.start()
        self.port = self.server.port
        self.address = f"fleet@{self.host}:{self.port}"
        self.emit({"event": "coordinator", "address": f"{self.host}:{self.port}", "epoch": self.epoch,
                   "tls": self.tls is not None})

    # ---- the join protocol (called by the MarkServer) ---------------------------------------------
    async def join(self, peer: str, cmd: list[bytes]) -> bytes:
        seen = int(cmd[3])
        if seen > self.epoch:
            raise RefusedError(f"fenced: this coordinator's epoch {self.epoch} is older than epoch {seen}, "
                               "which this proxy has seen")
        try:
            await asyncio.wait_for(self._lock.acquire(), JOIN_WAIT)
        except TimeoutError:
            raise RefusedError("busy: an instruction did not finish in time; join again") from None
        self._joining[peer] = asyncio.get_running_loop().call_later(READY_TIMEOUT, self._expired, peer)
        assert self.upstream is not None
        state = {"epoch": self.epoch, "upstream": self.upstream.to_url(), "frozen": self.frozen,
                 "prepared": self.prepared.to_url() if self.prepared else None,
                 "held": [[db, base64.b64encode(k).decode()] for db, k in sorted(self.held)],
                 "ended": self.ended}
        return json.dumps(state).encode()

    def ready(self, peer: str, cmd: list[bytes], host: str) -> bool:
        """READY: the proxy applied the state; it is a member from now on. False if its join expired."""
        timer = self._joining.pop(peer, None)
        if timer is None:
            return False
        timer.cancel()
        client, admin = (_reachable(cmd[i].decode(), host) for i in (1, 2))
        member = Member(peer, peer.split("@")[0], client, admin, self.token, self.epoch,
                        self.tls.client if self.tls else None)
        self.members[peer] = member
        self._lock.release()
        log.info("fleet.joined", peer=peer, client=client, admin=admin, members=len(self.members))
        self.emit({"event": "proxy_joined", "proxy": member.proxy_id, "address": client,
                   "members": len(self.members), "frozen": self.frozen})
        return True

    def left(self, peer: str) -> None:
        """The peer's mark connection ended (cleanly or not)."""
        timer = self._joining.pop(peer, None)
        if timer is not None:
            timer.cancel()
            self._lock.release()
        member = self.members.pop(peer, None)
        if member is None:
            return
        member.gone.set()
        log.info("fleet.left", peer=peer, members=len(self.members))
        self.emit({"event": "proxy_left", "proxy": member.proxy_id, "address": member.address,
                   "members": len(self.members)})
        task = asyncio.get_running_loop().create_task(member.close_admin())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _expired(self, peer: str) -> None:
        if self._joining.pop(peer, None) is not None:
            log.warning("fleet.join_expired", peer=peer, timeout=READY_TIMEOUT)
            self._lock.release()     # its READY, if it still comes, is refused

    # ---- instructions (ProxyHandle) ------------------------------------------------------------
    async def _each(self, what: str, op: Callable[[Member], Awaitable[None]]) -> None:
        """``op`` on every member at once. A failure on a member that has left is skipped (it no longer
        serves anyone); any other failure is raised after all have answered."""
        members = list(self.members.values())
        results = await asyncio.gather(*(op(m) for m in members), return_exceptions=True)
        failed: list[BaseException] = []
        for m, r in zip(members, results):
            if not isinstance(r, BaseException):
                continue
            if isinstance(r, FencedError):
                failed.insert(0, r)     # a newer coordinator exists: that is what the caller must see
                continue
            if not m.gone.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(m.gone.wait(), GONE_WAIT)
            if m.gone.is_set():
                log.info("fleet.skipped_departed", instruction=what, proxy=m.proxy_id, reason=str(r))
                self.emit({"event": "proxy_departed_skipped", "instruction": what, "proxy": m.proxy_id})
                continue
            failed.append(r)
        if failed:
            raise failed[0]

    async def prepare_flip(self, upstream: Endpoint) -> None:
        async with self._lock:
            self.prepared = upstream
            await self._each("prepare", lambda m: m.prepare_flip(upstream))

    async def unprepare(self) -> None:
        async with self._lock:
            self.prepared = None
            await self._each("unprepare", lambda m: m.unprepare())

    async def freeze(self, timeout: float) -> None:
        async with self._lock:
            self.frozen = True
            await self._each("freeze", lambda m: m.freeze(timeout))

    async def flip(self, upstream: Endpoint) -> None:
        async with self._lock:
            self.upstream, self.prepared = upstream, None
            await self._each("flip", lambda m: m.flip(upstream))

    async def unfreeze(self) -> None:
        async with self._lock:
            self.frozen = False
            await self._each("unfreeze", lambda m: m.unfreeze())

    async def hold_keys(self, keys: set[tuple[int, bytes]], timeout: float) -> None:
        async with self._lock:
            self.held = self.held | keys
            await self._each("hold", lambda m: m.hold_keys(keys, timeout))

    async def release_keys(self) -> None:
        async with self._lock:
            self.held = set()
            await self._each("release", lambda m: m.release_keys())

    async def clients(self) -> dict[str, Any]:
        """The members' client readiness reports as one (a member that cannot answer now is left out)."""
        members = list(self.members.values())
        reports = await asyncio.gather(*(m.clients() for m in members), return_exceptions=True)
        return merge([r for r in reports if isinstance(r, dict)])

    async def end_migration(self) -> None:
        async with self._lock:
            self.ended = True
            await self._each("end-migration", lambda m: m.end_migration())

    async def stop(self) -> None:
        """The coordinator ends: members lose their mark stream and refuse writes until a coordinator
        takes them back (fail closed); they are separate processes and are not stopped from here."""
        if self.server is not None:
            await self.server.stop()
        for m in list(self.members.values()):
            await m.close_admin()
        self.members.clear()


def _reachable(address: str, peer_host: str) -> str:
    """An announced HOST:PORT; a wildcard host (0.0.0.0, ::, empty) is the address the peer came from."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = peer_host
    return f"{host}:{port}"
