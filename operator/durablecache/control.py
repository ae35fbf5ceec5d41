"""The migration's control API: status for humans and the operator, approval, rollback, and accepting
a repair that stopped to ask.

Listens separately from the proxy and requires a bearer token on every request."""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from .migration import Migration


class ControlServer:
    def __init__(self, migration: Migration, token: str, host: str = "127.0.0.1", port: int = 0):
        self.m = migration
        self.token = token
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/status", self._status)
        app.router.add_post("/approve", self._approve)
        app.router.add_post("/rollback", self._rollback)
        app.router.add_post("/accept-repair", self._accept_repair)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # RFC 6750: "Bearer <token>" (the scheme is case-insensitive). A bare token is refused, as the
        # proxy's admin API refuses it: a header sent to the wrong service must not work by accident.
        scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return web.json_response({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response(self.m.status())

    async def _approve(self, _request: web.Request) -> web.Response:
        refused = self.m.approve()
        if refused:
            return web.json_response({"error": refused}, status=409)
        return web.json_response({"approved": True, "phase": self.m.phase.value})

    async def _rollback(self, _request: web.Request) -> web.Response:
        refused = self.m.request_rollback()
        if refused:
            return web.json_response({"error": refused}, status=409)
        return web.json_response({"rollback": "requested"})

    async def _accept_repair(self, _request: web.Request) -> web.Response:
        blocked = self.m.state.get("repairBlocked")
        refused = self.m.accept_repair()
        if refused:
            return web.json_response({"error": refused}, status=409)
        return web.json_response({"accepted": True, "repair": blocked})

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
