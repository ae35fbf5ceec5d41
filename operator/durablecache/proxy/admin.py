"""The proxy's admin API: a separate HTTP listener, every request needs ``Authorization: Bearer <token>``.
With the fleet's TLS (fleettls.py) it is HTTPS and a client must present the fleet's certificate.

    GET  /healthz                    -> {"ok": true}
    GET  /stats                      -> Proxy.stats()
    GET  /clients                    -> the client readiness report (proxy/readiness.py)
    POST /end-migration              -> 200 {"migrating": false}: the migration is over, the proxy stays
                                        a plain front end (no marks, nothing refused for its sake)
    POST /freeze?timeout=S           -> 200 {"frozen": true, "ms": ...}, 504 if not quiesced in time (still frozen)
    POST /prepare {"upstream": URL}  -> 200 {"upstream": redacted URL, "ms": ...}: discover it now and
                                        open every session's connection to it, so that the next /flip
                                        to it need not while writes are frozen (502 if it cannot be
                                        reached or the connection budget would be exceeded)
    POST /unprepare                  -> 200 {"prepared": false}: an aborted attempt closes what /prepare opened
    POST /flip   {"upstream": URL}   -> 200 {"upstream": redacted URL}   (only while frozen; 409 otherwise)
    POST /unfreeze                   -> 200 {"frozen": false}
    POST /hold?timeout=S {"keys": [...], "db": 0, "encoding": "latin-1" | "base64"}
                                     -> 200 {"held": N, "ms": ...}, 504 if writes to them are still in
                                        flight (the keys stay held), 400 on a malformed body.
                                        An item of "keys" is a string (in "db"), or a [db, string] pair.
    POST /release                    -> 200 {"held": 0}

Fencing (docs/ha.md): a POST may carry ``X-DurableCache-Epoch: N``, the sending coordinator's epoch.
The proxy remembers the highest epoch it has seen (here or in its fleet state) and refuses an
instruction from an older one with 409 {"error": "fenced: ...", "epoch": highest}, before doing anything.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ssl
import time
from typing import Any

from aiohttp import web

from .. import logs
from ..errors import DurableCacheError
from ..urls import Endpoint, parse_url
from .server import Proxy

log = logs.get("durablecache.proxy.admin")
EPOCH_HEADER = "X-DurableCache-Epoch"


class Fence:
    """The highest coordinator epoch a proxy has seen; older instructions are refused."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def admit(self, epoch: int) -> str | None:
        """None if an instruction of ``epoch`` may be carried out (and remember it), else why not."""
        if epoch < self.epoch:
            return (f"fenced: an instruction from coordinator epoch {epoch}, but this proxy has seen "
                    f"epoch {self.epoch}; a newer coordinator holds the lease")
        self.epoch = epoch
        return None


class AdminServer:
    def __init__(self, proxy: Proxy, token: str, host: str = "127.0.0.1", port: int = 0,
                 fence: Fence | None = None, tls: ssl.SSLContext | None = None):
        if not token:
            raise ValueError("the admin API needs a token")
        self.proxy = proxy
        self.fence = fence or Fence()
        self.host = host
        self.port = port
        self._token = token
        # fleettls.FleetTLS.server: HTTPS, and a client must present the fleet's certificate (the
        # coordinator does); one that does not never reaches a handler.
        self.tls = tls
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/clients", self._clients)
        app.router.add_post("/end-migration", self._end_migration)
        app.router.add_post("/freeze", self._freeze)
        app.router.add_post("/prepare", self._prepare)
        app.router.add_post("/unprepare", self._unprepare)
        app.router.add_post("/flip", self._flip)
        app.router.add_post("/unfreeze", self._unfreeze)
        app.router.add_post("/hold", self._hold)
        app.router.add_post("/release", self._release)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), self._token.encode()):
            return web.json_response({"error": "unauthorized"}, status=401)
        if request.method == "POST" and EPOCH_HEADER in request.headers:
            try:
                epoch = int(request.headers[EPOCH_HEADER])
            except ValueError:
                return web.json_response({"error": f"{EPOCH_HEADER} must be an integer"}, status=400)
            refused = self.fence.admit(epoch)
            if refused is not None:
                log.warning("proxy.fenced", path=request.path, epoch=epoch, seen=self.fence.epoch)
                return web.json_response({"error": refused, "epoch": self.fence.epoch}, status=409)
        return await handler(request)

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.tls)
        await site.start()
        sockets = getattr(site._server, "sockets", None)  # an asyncio.Server once started
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("proxy.admin_listening", address=f"{self.host}:{self.port}", tls=self.tls is not None)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "frozen": self.proxy.frozen, "epoch": self.fence.epoch})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.proxy.stats())

    async def _clients(self, request: web.Request) -> web.Response:
        return web.json_response(self.proxy.readiness.report())

    async def _end_migration(self, request: web.Request) -> web.Response:
        self.proxy.end_migration()
        return web.json_response({"migrating": False})

    async def _freeze(self, request: web.Request) -> web.Response:
        try:
            timeout = float(request.query.get("timeout", "5"))
        except ValueError:
            return web.json_response({"error": "timeout must be a number of seconds"}, status=400)
        started = time.monotonic()
        try:
            await self.proxy.freeze(timeout)
        except TimeoutError as exc:
            return web.json_response({"frozen": True, "quiesced": False, "error": str(exc)}, status=504)
        return web.json_response({"frozen": True, "quiesced": True,
                                  "ms": round((time.monotonic() - started) * 1000, 2)})

    async def _prepare(self, request: web.Request) -> web.Response:
        endpoint = await upstream_of(request)
        if isinstance(endpoint, web.Response):
            return endpoint
        started = time.monotonic()
        try:
            await self.proxy.prepare_flip(endpoint)
        except (DurableCacheError, OSError, TimeoutError) as exc:
            return web.json_response({"error": str(exc)}, status=502)
        return web.json_response({"upstream": endpoint.redacted(),
                                  "ms": round((time.monotonic() - started) * 1000, 2)})

    async def _unprepare(self, request: web.Request) -> web.Response:
        self.proxy.unprepare()
        return web.json_response({"prepared": False})

    async def _flip(self, request: web.Request) -> web.Response:
        endpoint = await upstream_of(request)
        if isinstance(endpoint, web.Response):
            return endpoint
        if not self.proxy.frozen:
            return web.json_response({"error": "freeze first"}, status=409)
        try:
            await self.proxy.flip(endpoint)
        except TimeoutError as exc:
            return web.json_response({"error": str(exc)}, status=504)
        except DurableCacheError as exc:
            return web.json_response({"error": str(exc)}, status=502)
        return web.json_response({"upstream": endpoint.redacted()})

    async def _unfreeze(self, request: web.Request) -> web.Response:
        self.proxy.unfreeze()
        return web.json_response({"frozen": False})

    async def _hold(self, request: web.Request) -> web.Response:
        try:
            timeout = float(request.query.get("timeout", "5"))
            keys = parse_keys(await request.json())
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            return web.json_response({"error": f"need JSON {{\"keys\": [...], \"db\": N, \"encoding\": "
                                               f"\"latin-1\"|\"base64\"}}: {exc}"}, status=400)
        started = time.monotonic()
        try:
            await self.proxy.hold_keys(keys, timeout)
        except TimeoutError as exc:
            return web.json_response({"held": len(keys), "quiesced": False, "error": str(exc)}, status=504)
        return web.json_response({"held": len(keys), "quiesced": True,
                                  "ms": round((time.monotonic() - started) * 1000, 2)})

    async def _release(self, request: web.Request) -> web.Response:
        self.proxy.release_keys()
        return web.json_response({"held": 0})


async def upstream_of(request: web.Request) -> Endpoint | web.Response:
    """The endpoint a request's JSON body names, or the 400 response saying what is wrong."""
    try:
        body = await request.json()
        return parse_url(str(body["upstream"]))
    except (ValueError, KeyError, TypeError, DurableCacheError) as exc:
        return web.json_response({"error": f"need JSON {{\"upstream\": URL}}: {exc}"}, status=400)


def parse_keys(body: Any) -> set[tuple[int, bytes]]:
    """The /hold body -> (db, key) pairs. Keys are bytes: latin-1 maps each byte to one character,
    base64 suits any client."""
    encoding = str(body.get("encoding", "latin-1")).lower()
    if encoding not in ("latin-1", "base64"):
        raise ValueError(f"unknown encoding {encoding!r}")
    default_db = int(body.get("db", 0))
    items = body["keys"]
    if not isinstance(items, list):
        raise TypeError("keys must be a list")

    def decode(text: Any) -> bytes:
        if not isinstance(text, str):
            raise TypeError("a key must be a string")
        return base64.b64decode(text, validate=True) if encoding == "base64" else text.encode("latin-1")

    out: set[tuple[int, bytes]] = set()
    for item in items:
        if isinstance(item, list) and len(item) == 2:
            out.add((int(item[0]), decode(item[1])))
        else:
            out.add((default_db, decode(item)))
    return out
