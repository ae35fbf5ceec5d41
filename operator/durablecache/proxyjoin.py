"""A proxy process that joins a coordinator's fleet (`durablecache proxy --join`, docs/ha.md).

The proxy side of fleet.py's exchange: on its mark connection it says HELLO-FLEET, takes the state
(authority, frozen, held keys, prepared target, epoch), builds its Proxy on it, then opens its client
port and admin API and says READY. Its marks then flow on that connection (RemoteMarks). When the
connection ends, the proxy refuses writes (proxy/delivery.py, fail closed) and keeps rejoining; a rejoin
applies the state again. If the authority moved while it was away, or the coordinator is older than
one it has seen, it stops (exit code 3): its clients reconnect to a proxy that knows the truth.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import time
from typing import Any

import libvalkey

from . import logs
from .errors import ConnectError
from .fleettls import FleetTLS, TLSRefused
from .proxy import Proxy
from .proxy.admin import AdminServer, Fence
from .proxy.marks import RemoteMarks, read_reply
from .urls import parse_url

log = logs.get("durablecache.proxy.join")
EXIT_STALE = 3
# How long one (re)connect attempt may take: a write in flight when the stream ended waits this long
# for its marks' ack before its client's connection is closed instead of answered.
RETRY_FOR = 2.0
JOIN_TIMEOUT = 120.0     # the first join: the coordinator may start after its proxies
STOP_DRAIN = 5.0         # seconds a stopping proxy waits for its writes in flight and their marks


class Joiner:
    """Owns the Proxy, its admin API and the mark stream of a proxy that joined a fleet."""

    def __init__(self, coordinator: tuple[str, int], token: str, proxy_id: str, *, listen: tuple[str, int],
                 admin: tuple[str, int], announce: str | None = None, client_tls: ssl.SSLContext | None = None,
                 migrating: bool = True, name_prefix: str = "durablecache-proxy", fleet_tls: FleetTLS | None = None,
                 **proxy_settings: Any):
        self.token = token
        # The fleet's TLS (docs/ha.md, Transport): on the mark channel (the coordinator must present the
        # fleet's certificate; this proxy presents it too) and on the admin API; None: plain TCP.
        self.fleet_tls = fleet_tls
        self.proxy_settings = proxy_settings    # more Proxy settings: max_clients, announce_host, reuse_port
        self.proxy_id = proxy_id
        self.listen = listen
        self.admin_addr = admin
        self.announce = announce
        self.client_tls = client_tls
        self.migrating = migrating
        self.name_prefix = name_prefix
        self.fence = Fence()
        self.proxy: Proxy | None = None
        self.admin: AdminServer | None = None
        self.remote = RemoteMarks(coordinator[0], coordinator[1], token, name=proxy_id, greet=self._greet,
                                  retry_for=RETRY_FOR, tls=fleet_tls.client if fleet_tls else None,
                                  role="coordinator")
        self.failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def start(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Join (the Proxy and the admin API are made on the way), trying for ``timeout`` seconds;
        ConnectError if it cannot, or at once if it must not (a stale coordinator)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.remote.connect()
                return
            except ConnectError as exc:
                # TLSRefused: the two ends disagree on the transport or the certificate; waiting won't help.
                if self.failed.done() or isinstance(exc, TLSRefused) or time.monotonic() > deadline:
                    raise
                log.warning("proxy.join_retry", reason=str(exc))
                await asyncio.sleep(RETRY_FOR / 2)

    async def stop(self, drain: float = STOP_DRAIN) -> bool:
        """Leave the fleet. A clean goodbye (BYE) tells the coordinator no mark was lost, so it must be
        true: first every write is held and those in flight are answered and their marks acknowledged
        (a FREEZE); held writes are never sent, their clients see the connection close. If that does
        not finish within ``drain`` seconds, the proxy leaves without BYE and the coordinator repairs.
        Returns whether it said goodbye."""
        clean = True
        if self.proxy is not None:
            try:
                await self.proxy.freeze(drain)
            except TimeoutError:
                clean = False
        if self.admin is not None:
            await self.admin.stop()
        if self.proxy is not None:
            await self.proxy.stop()
        if clean and not self.failed.done():
            await self.remote.close()
        log.info("proxy.left_fleet", clean=clean)
        return clean

    def _fail(self, why: str) -> ConnectError:
        log.error("proxy.join_stale", reason=why)
        if not self.failed.done():
            self.failed.set_result(why)
        return ConnectError(why)

    async def _greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parser: Any) -> None:
        who = f"the coordinator at {self.remote.host}:{self.remote.port}"
        writer.write(libvalkey.pack_command((b"HELLO-FLEET", self.token.encode(), self.proxy_id.encode(),
                                             str(self.fence.epoch).encode())))
        reply = await read_reply(reader, parser, who)
        if isinstance(reply, libvalkey.ReplyError):
            if "fenced" in str(reply):
                raise self._fail(f"{who} refused us: {reply}")
            raise ConnectError(f"{who} refused us: {reply}")
        state = json.loads(reply)
        refused = self.fence.admit(int(state["epoch"]))
        if refused is not None:
            raise self._fail(refused)
        if self.proxy is None:
            await self._first(state)
        else:
            await self._again(self.proxy, state)
        assert self.proxy is not None and self.admin is not None
        client = self.announce or f"{self.listen[0]}:{self.proxy.port}"
        writer.write(libvalkey.pack_command((b"READY", client.encode(),
                                             f"{self.admin_addr[0]}:{self.admin.port}".encode())))
        reply = await read_reply(reader, parser, who)
        if isinstance(reply, libvalkey.ReplyError):
            raise ConnectError(f"{who} refused us: {reply}")
        log.info("proxy.joined", coordinator=f"{self.remote.host}:{self.remote.port}", epoch=self.fence.epoch,
                 frozen=state["frozen"], held=len(state["held"]), prepared=bool(state["prepared"]))

    async def _first(self, state: dict[str, Any]) -> None:
        """Build the proxy on the state before its client port opens: frozen and held as the fleet is
        (with no client yet nothing is in flight), PREPAREd once it runs (a client that came first
        gets its prepared connection then). Writes are refused until READY is accepted."""
        proxy = Proxy(parse_url(state["upstream"]), listen_host=self.listen[0], listen_port=self.listen[1],
                      on_marks=self.remote, client_tls=self.client_tls, migrating=self.migrating,
                      name_prefix=self.name_prefix, **self.proxy_settings)
        proxy.frozen = bool(state["frozen"])
        held = _keys(state["held"])
        if held:
            await proxy.hold_keys(held, 1.0)
        await proxy.start()
        self.proxy = proxy
        if state["prepared"]:
            await proxy.prepare_flip(parse_url(state["prepared"]))
        self.admin = AdminServer(proxy, self.token, self.admin_addr[0], self.admin_addr[1], fence=self.fence,
                                 tls=self.fleet_tls.server if self.fleet_tls else None)
        await self.admin.start()
        if state.get("ended"):
            proxy.end_migration()      # joined after the end: a plain front end

    async def _again(self, proxy: Proxy, state: dict[str, Any]) -> None:
        """Rejoining after the stream ended: take the fleet's state as it is now."""
        if parse_url(state["upstream"]) != proxy.upstream:
            raise self._fail("the authority moved while this proxy was away from its coordinator; it stops so "
                             "that its clients reconnect to a proxy on the authoritative side")
        if state["frozen"]:
            proxy.frozen = True        # its marks in flight are re-sent after READY; the repair covers them
        elif proxy.frozen:
            proxy.unfreeze()
        proxy.release_keys()
        held = _keys(state["held"])
        if held:
            with contextlib.suppress(TimeoutError):   # held all the same; what is in flight is acked after READY
                await proxy.hold_keys(held, 0.0)
        if state["prepared"]:
            await proxy.prepare_flip(parse_url(state["prepared"]))
        else:
            proxy.unprepare()
        if state.get("ended") and proxy.migrating:
            proxy.end_migration()


def _keys(items: list[list[Any]]) -> set[tuple[int, bytes]]:
    return {(int(db), base64.b64decode(k)) for db, k in items}
