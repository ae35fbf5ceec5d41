"""Ways to run the migration's proxies: in this process, or as supervised `durablecache proxy`
subprocesses that stream their marks back to this process's syncer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from . import logs
from .errors import ConnectError, FencedError
from .migration import MarkCallback, ProxyHandle, ProxyStarter
from .ports import free_port
from .proxy import MarkServer, Proxy
from .proxy.admin import EPOCH_HEADER
from .urls import Endpoint

log = logs.get("durablecache.proxies")
ADMIN_TIMEOUT = 30.0
START_TIMEOUT = 20.0


class LocalProxy:
    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.address = f"{proxy.listen_host}:{proxy.port}"

    async def freeze(self, timeout: float) -> None:
        await self.proxy.freeze(timeout)

    async def prepare_flip(self, upstream: Endpoint) -> None:
        await self.proxy.prepare_flip(upstream)

    async def unprepare(self) -> None:
        self.proxy.unprepare()

    async def flip(self, upstream: Endpoint) -> None:
        await self.proxy.flip(upstream)

    async def unfreeze(self) -> None:
        self.proxy.unfreeze()

    async def hold_keys(self, keys: set[tuple[int, bytes]], timeout: float) -> None:
        await self.proxy.hold_keys(keys, timeout)

    async def release_keys(self) -> None:
        self.proxy.release_keys()

    async def clients(self) -> dict[str, Any]:
        return self.proxy.readiness.report()

    async def end_migration(self) -> None:
        self.proxy.end_migration()

    async def stop(self) -> None:
        await self.proxy.stop()

    async def stats(self) -> dict[str, Any]:
        return self.proxy.stats()


def local_proxies(host: str, port: int, client_tls: ssl.SSLContext | None = None, **settings: Any) -> ProxyStarter:
    """``settings``: more of Proxy's keyword arguments (max_clients, announce_host ...)."""
    async def start(upstream: Endpoint, on_marks: MarkCallback, _on_lost: Callable[[str], None]) -> list[ProxyHandle]:
        proxy = Proxy(upstream, listen_host=host, listen_port=port, on_marks=on_marks, client_tls=client_tls,
                      **settings)
        await proxy.start()
        return [LocalProxy(proxy)]

    return start


class AdminDriven:
    """A proxy in another process, driven through its admin API (proxy/admin.py). Every instruction
    carries the coordinator's ``epoch`` (docs/ha.md, fencing): a proxy that has seen a newer one
    answers 409, which is raised as FencedError."""

    address: str

    def __init__(self, token: str, epoch: int = 0, tls: ssl.SSLContext | None = None):
        self.token = token
        self.epoch = epoch
        # fleettls.FleetTLS.client: HTTPS to a proxy that must present the fleet's certificate
        self.tls = tls
        self.admin_base = ""          # http[s]://host:port of the admin API
        self._session: aiohttp.ClientSession | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def _open_session(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self.tls) if self.tls is not None else None
        self._session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}",
                                                       EPOCH_HEADER: str(self.epoch)}, connector=connector)

    async def _admin(self, method: str, path: str, json: Any = None, timeout: float = ADMIN_TIMEOUT) -> Any:
        assert self._session
        url = f"{self.admin_base}{path}"
        try:
            async with self._session.request(method, url, json=json,
                                             timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                body = await r.json()
        except aiohttp.ClientError as exc:   # the child died or answered garbage: an aborted step
            raise ConnectError(f"proxy {self.address}: {method} {path} failed: {exc}") from exc
        if r.status == 504:
            raise TimeoutError(body.get("error", "timed out"))
        if r.status == 409 and "epoch" in body:
            raise FencedError(f"proxy {self.address}: {method} {path} refused: {body.get('error')}")
        if r.status >= 400:
            raise ConnectError(f"proxy {self.address}: {method} {path} failed: {body.get('error')}")
        return body

    async def freeze(self, timeout: float) -> None:
        await self._admin("POST", f"/freeze?timeout={timeout}", timeout=timeout + 5)

    async def prepare_flip(self, upstream: Endpoint) -> None:
        await self._admin("POST", "/prepare", json={"upstream": upstream.to_url()})

    async def unprepare(self) -> None:
        await self._admin("POST", "/unprepare")

    async def flip(self, upstream: Endpoint) -> None:
        await self._admin("POST", "/flip", json={"upstream": upstream.to_url()})

    async def unfreeze(self) -> None:
        await self._admin("POST", "/unfreeze")

    async def hold_keys(self, keys: set[tuple[int, bytes]], timeout: float) -> None:
        body = {"encoding": "base64", "keys": [[db, base64.b64encode(k).decode()] for db, k in sorted(keys)]}
        await self._admin("POST", f"/hold?timeout={timeout}", json=body, timeout=timeout + 5)

    async def release_keys(self) -> None:
        await self._admin("POST", "/release")

    async def clients(self) -> dict[str, Any]:
        body: dict[str, Any] = await self._admin("GET", "/clients", timeout=5.0)
        return body

    async def end_migration(self) -> None:
        await self._admin("POST", "/end-migration")

    async def stats(self) -> dict[str, Any]:
        """The proxy's GET /stats (client counts; the worker sums them into status.proxyClients)."""
        return await self._admin("GET", "/stats", timeout=5.0)  # type: ignore[no-any-return]

    async def close_admin(self) -> None:
        if self._session:
            await self._session.close()


class SubprocessProxy(AdminDriven):
    """A `durablecache proxy` child process, driven through its admin API and restarted if it dies.

    Its marks travel over the MarkServer; when it dies, the MarkServer reports the lost connection
    and the syncer demands a full verify-and-repair before any cutover."""

    def __init__(self, host: str, port: int, upstream: Endpoint, marks: MarkServer, workdir: str,
                 max_restarts: int = 20, extra_args: list[str] | None = None, epoch: int = 0):
        super().__init__(secrets.token_hex(16), epoch)
        self.host, self.port = host, port
        # More `durablecache proxy` flags: --reuse-port for one of several processes on one port, TLS ...
        self.extra_args = list(extra_args or [])
        self.address = f"{host}:{port}"
        self.upstream = upstream
        self.marks = marks
        self.workdir = workdir
        self.max_restarts = max_restarts
        self.admin_port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.on_restart: Callable[[dict[str, Any]], None] = lambda _e: None
        self.migration_ended = False    # a child (re)started after that serves without marks
        self.log_name = "proxy.log"

    def _write_secret(self, name: str, value: str) -> str:
        path = os.path.join(self.workdir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
        return path

    async def start(self) -> None:
        self._open_session()
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _spawn(self) -> None:
        self.admin_port = free_port()
        self.admin_base = f"http://127.0.0.1:{self.admin_port}"
        args = [sys.executable, "-m", "durablecache.cli", "--log-json", "proxy", "--listen", self.address,
                "--admin", f"127.0.0.1:{self.admin_port}",
                "--admin-token-file", self._write_secret("admin.token", self.token), *self.extra_args]
        if self.migration_ended:
            args.append("--not-migrating")
        else:
            args += ["--marks-to", f"{self.marks.host}:{self.marks.port}",
                     "--marks-token-file", os.path.join(self.workdir, "marks.token")]
        # The upstream URL carries the password: hand it over in the environment, not on the command
        # line, where any local user could read it.
        env = {**os.environ, "DURABLECACHE_UPSTREAM": self.upstream.to_url()}
        with open(os.path.join(self.workdir, self.log_name), "ab") as log_file:  # the child keeps its own fd
            self.proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.DEVNULL, stderr=log_file,
                                                             env=env)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.returncode is None:
                with contextlib.suppress(OSError, aiohttp.ClientError, ConnectError, TimeoutError):
                    if await self._admin("GET", "/healthz", timeout=1.0):
                        return
                await asyncio.sleep(0.1)
            raise ConnectError(f"proxy subprocess on {self.address} did not start "
                               f"(see {self.workdir}/{self.log_name})")
        except BaseException:
            await self._kill_child()  # never leave a half-started proxy listening on the apps' port
            raise

    async def _kill_child(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self.proc
            code = await self.proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            self.on_restart({"event": "proxy_died", "address": self.address, "exit_code": code,
                             "restarts": self.restarts})
            if self.restarts > self.max_restarts:
                log.error("proxy keeps dying; giving up", address=self.address)
                return
            await asyncio.sleep(0.2)
            try:
                await self._spawn()
            except ConnectError as exc:
                log.error("proxy restart failed; trying again", address=self.address, error=str(exc))
                continue
            self.on_restart({"event": "proxy_process", "address": self.address, "pid": self.pid})

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def flip(self, upstream: Endpoint) -> None:
        self.upstream = upstream  # a restarted child starts on the side that is authoritative now
        await super().flip(upstream)

    # A child restarted before the flip has lost its PREPARE (its flip then discovers for itself) and
    # its hold (its lost mark stream forces a repair, so the cutover aborts rather than trusting it).

    async def clients(self) -> dict[str, Any]:
        body: dict[str, Any] = await self._admin("GET", "/clients", timeout=5.0)
        return body

    async def end_migration(self) -> None:
        self.migration_ended = True
        await self._admin("POST", "/end-migration")

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor:
            self._supervisor.cancel()
        await self._kill_child()
        await self.close_admin()


def subprocess_proxies(host: str, port: int, emit: Callable[[dict[str, Any]], None], processes: int = 1,
                       proxy_args: list[str] | None = None, *, epoch: int = 0) -> tuple[ProxyStarter, list]:
    """A starter for ``processes`` supervised proxy subprocesses on one port (more than one: they share
    it with SO_REUSEPORT), each with its own admin API and mark stream; ``proxy_args``: more flags for
    each (TLS, --announce, --max-clients); ``epoch``: the fencing epoch every instruction carries. The
    second value collects what must be closed."""
    owned: list[Any] = []
    extra = list(proxy_args or []) + (["--reuse-port"] if processes > 1 else [])

    async def start(upstream: Endpoint, on_marks: MarkCallback, on_lost: Callable[[str], None]) -> list[ProxyHandle]:
        workdir = tempfile.mkdtemp(prefix="durablecache-proxy-")
        marks_token = secrets.token_hex(16)
        marks = MarkServer(on_marks, marks_token, on_lost=lambda peer: on_lost(f"proxy {peer} lost its mark stream"))
        await marks.start()
        owned.append(marks)
        handles: list[ProxyHandle] = []
        for i in range(processes):
            child = SubprocessProxy(host, port, upstream, marks, workdir, extra_args=extra, epoch=epoch)
            child.log_name = f"proxy-{i}.log" if processes > 1 else "proxy.log"
            owned.append(child)  # stopped by the caller even if it never finished starting
            child._write_secret("marks.token", marks_token)
            child.on_restart = emit
            await child.start()
            emit({"event": "proxy_process", "address": child.address, "pid": child.pid})
            handles.append(child)
        return handles

    return start, owned
