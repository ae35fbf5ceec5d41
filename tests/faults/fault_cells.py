"""The fault matrix: fault x phase cells, each a real migration under ledger write load with one fault
injected at a chosen point, and the oracle that judges it.

Oracle, per cell:
- ``no-loss`` cells: 0 acknowledged writes missing or wrong on the authoritative side at the end (the
  target if the migration flipped, per its state file; the source otherwise), and `durablecache verify`
  of source against target equal once the writers stopped.
- ``refuse`` cells (the right outcome is that DurableCache does not go on: a client writing around the
  proxy, a side that came back empty): no cutover (or flip back) happened while the fault stood, the
  tool said something beyond its routine events, and no acknowledged write is lost. Where the server
  that was authoritative at the time of the fault itself came back empty, its own loss cannot be undone
  by any tool: a write then counts as lost only if *neither* side has it (DurableCache must not
  destroy the surviving copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import valkey
from fault_ledger import LedgerWorkload, check_ledgers, counter_totals
from fault_runner import (
    Event,
    MigrationRun,
    aof_server,
    client,
    is_event,
    is_phase,
    kill_server,
    restart_server,
    verify,
)
from faultproxy import FaultProxy

from durablecache.testing.localvalkey import LocalServer
from durablecache.testing.waiting import wait_for
from durablecache.testing.workload import seed

# A write the authoritative server acknowledged this shortly before it crashed and came back empty can
# be gone from both sides without DurableCache at fault (reverse sync copies within milliseconds; a
# non-durable server loses what it had). Reported apart, next to the lost count.
CRASH_WINDOW = 0.1

# Events every migration emits on its way; anything else is the tool saying something.
ROUTINE = {"phase", "proxies", "control", "progress", "copied", "awaiting_approval", "serving", "route_out",
           "repair", "repaired", "cutover", "rolled_back", "_started", "_exited"}
PHASES = ["Copy", "Sync", "Cutover", "RouteOut", "Rollback"]
# As in tests/conftest.py: the source is valkey-server 8.1, a durable target is Valkey >= 9 (9.1).
# Environment DURABLECACHE_FAULTS_SOURCE / _TARGET (valkey8 | valkey9 | redis7) pick others.
SOURCE_ENGINE = os.environ.get("DURABLECACHE_FAULTS_SOURCE", "valkey8")
TARGET_ENGINE = os.environ.get("DURABLECACHE_FAULTS_TARGET", "valkey9")
# Both servers refuse what ElastiCache refuses (docs/aws.md), so that no cell passes thanks to a command
# a real cluster would not run; the harness's own CONFIG SET and SAVE use the harness-only names
# (LocalServer.admin). DURABLECACHE_FAULTS_RESTRICTED=0 runs plain servers.
RESTRICTED = os.environ.get("DURABLECACHE_FAULTS_RESTRICTED", "1") != "0"


def notable(e: Event) -> bool:
    """An event beyond the routine ones: a repair counts unless it is the planned pass after the copy."""
    name = e.get("event")
    if name == "repair":
        return bool(e.get("reason")) and not e.get("planned") and "after the copy" not in str(e.get("reason"))
    return name not in ROUTINE


@dataclasses.dataclass
class Ctx:
    source: LocalServer
    target: LocalServer
    run: MigrationRun
    writers: LedgerWorkload
    proxy: FaultProxy | None
    notes: list[str] = dataclasses.field(default_factory=list)
    others: list[LedgerWorkload] = dataclasses.field(default_factory=list)
    fault_at: int = 0                 # event index when the fault was injected
    fault_cleared_at: int | None = None  # event index when the fault ended (refuse cells)
    counter_base: dict[str, int] | None = None   # counters' acked totals when a side came back empty
    crashed_at: float | None = None               # when a server that came back empty was killed


Fault = Callable[[Ctx], None]


@dataclasses.dataclass
class Cell:
    fault: str
    phase: str
    inject: Fault
    expect: str = "no-loss"            # or "refuse"
    proxy_side: str | None = None      # "target": the migration reaches the target through a FaultProxy
    target_aof: bool = False
    seed_keys: int = 2000
    refuse_wait: float = 20.0          # refuse cells: how long the tool is watched holding off
    outcome_wait: float = 45.0         # no-loss cells: how long a cutover may take after approval
    verify_wait: float = 20.0          # how long verify is retried while the syncer catches up
    must_name: str | None = None       # refuse cells: what the tool's words must name (not an event name)
    xfail_reason: str | None = None    # set by the fast subset where a feature has not landed

    @property
    def name(self) -> str:
        return f"{self.fault}@{self.phase}"


@dataclasses.dataclass
class Result:
    fault: str
    phase: str
    expect: str
    acked: int = 0
    uncertain: int = 0
    lost: int = 0
    crash_lost: int = 0      # missing, acknowledged by the crashed server in its last CRASH_WINDOW seconds
    lost_examples: list[str] = dataclasses.field(default_factory=list)
    verify: str = "not run"
    said: str = ""
    flipped: bool = False
    ok: bool = False
    why: str = ""
    seconds: float = 0.0

    def row(self) -> str:
        verdict = "ok" if self.ok else f"**FAIL** ({self.why})"
        said = self.said.replace("|", "/")
        lost = f"{self.lost}" + (f" (+{self.crash_lost} acked by the crashed server in its last "
                                 f"{CRASH_WINDOW * 1000:.0f} ms)" if self.crash_lost else "")
        return (f"| {self.fault} | {self.phase} | {self.acked} | {lost} | {self.verify.replace('|', '/')} | "
                f"{said} | {verdict} |")


# -- faults ---------------------------------------------------------------------------------------
def target_restart_empty(ctx: Ctx) -> None:
    ctx.crashed_at = restart_server(ctx.target, keep_data=False)
    ctx.counter_base = counter_totals(ctx.writers.ledgers)


def target_restart_data(ctx: Ctx) -> None:
    before = client(ctx.target).dbsize()
    restart_server(ctx.target, keep_data=True)
    ctx.notes.append(f"target keys before/after restart: {before}/{client(ctx.target).dbsize()}")


def source_restart_empty(ctx: Ctx) -> None:
    ctx.crashed_at = restart_server(ctx.source, keep_data=False)
    ctx.counter_base = counter_totals(ctx.writers.ledgers)


def net_cut(ctx: Ctx) -> None:
    assert ctx.proxy
    ctx.proxy.cut(2.0)
    with contextlib.suppress(AssertionError):   # best effort: the cell records what happened either way
        wait_for("the cut to heal", lambda: not ctx.proxy.refusing if ctx.proxy else True, 5)


def net_delay(ctx: Ctx) -> None:
    assert ctx.proxy
    ctx.proxy.set_latency(0.03)
    ctx.writers.wait_acked(300, 3)
    ctx.proxy.set_latency(0.0)


def net_drop_mid_reply(ctx: Ctx) -> None:
    assert ctx.proxy
    for _ in range(3):
        ctx.proxy.drop_mid_reply()
        with contextlib.suppress(AssertionError):   # best effort, as above
            wait_for("a reply cut", lambda: not ctx.proxy._drop_next_reply if ctx.proxy else True, 2)
    ctx.notes.append(f"replies cut: {ctx.proxy.dropped_replies}")


def target_refuses_writes(ctx: Ctx) -> None:
    ctx.target.admin("CONFIG", "SET", "min-replicas-to-write", 1)   # no replicas: every write gets NOREPLICAS
    try:
        ctx.writers.wait_acked(400, 3)
    finally:
        ctx.target.admin("CONFIG", "SET", "min-replicas-to-write", 0)


def kill_migration_after_flip(ctx: Ctx) -> None:
    ctx.run.kill()
    state = ctx.run.state()
    ctx.notes.append(f"state at kill: phase={state.get('phase')} flipped={state.get('flipped')}")
    ctx.run.start()
    if ctx.run.wait(is_event("proxies"), 60) is None:
        ctx.notes.append("restarted process never served")


def direct_writer(ctx: Ctx) -> None:
    """A client that connects to the source itself (not the proxy) after RouteIn and keeps writing."""
    w = LedgerWorkload(ctx.source.port, writers=1, rate=100, name="direct", client_name="billing-cron")
    ctx.others.append(w.start())
    w.wait_acked(50, 5)


def scripted_flushdb(ctx: Ctx) -> None:
    c = valkey.Valkey(host="127.0.0.1", port=ctx.run.listen, socket_timeout=5)
    try:
        reply: Any = c.eval("return redis.call('flushdb')", 0)
        ctx.notes.append(f"EVAL flushdb through the proxy: {reply!r}")
    except valkey.ValkeyError as exc:
        ctx.notes.append(f"EVAL flushdb through the proxy refused: {str(exc)[:80]}")
    finally:
        c.close()


# -- the cell runner ------------------------------------------------------------------------------
def _said(events: list[Event], run: MigrationRun, notes: list[str], names: dict[int, str]) -> str:
    parts: list[str] = []
    seen: dict[str, int] = {}
    for e in events:
        name = str(e.get("event"))
        if not notable(e):
            continue
        seen[name] = seen.get(name, 0) + 1
        if seen[name] == 1:
            detail = e.get("reason") or e.get("message") or e.get("clients") or e.get("changes") or ""
            if name == "side_changed":
                detail = f"{e.get('side')}: {detail}"
            parts.append(f"`{name}`" + (f" {str(detail)[:90]}" if detail else ""))
    for name, n in seen.items():
        if n > 1:
            parts.append(f"`{name}` x{n}")
    state = run.state()
    final = f"final phase {state.get('phase', '?')}" + (" (flipped)" if state.get("flipped") else "")
    if state.get("message"):
        final += f": {str(state['message'])[:120]}"
    err = run.stderr_tail(160)
    text = "; ".join([*parts, final, *notes, *([err] if err else [])])
    for port, name in names.items():
        text = text.replace(f"127.0.0.1:{port}", name)
    return text


def _drive(cell: Cell, ctx: Ctx) -> None:
    run, w = ctx.run, ctx.writers
    if cell.phase == "Copy":
        if run.wait(is_phase("Copy"), 60) is None:
            raise RuntimeError("never reached Copy")
        run.wait(is_event("progress"), 10)
        ctx.fault_at = run.mark()
        cell.inject(ctx)
        if run.wait(is_event("awaiting_approval"), 120) is None:
            ctx.notes.append("never reached Sync after the fault")
            return
        w.wait_acked(100, 5)
        run.control("/approve")
        _outcome(cell, ctx)
        return
    if run.wait(is_event("awaiting_approval"), 90) is None:
        raise RuntimeError("never reached awaiting_approval")
    w.wait_acked(200, 10)
    if cell.phase == "Sync":
        ctx.fault_at = run.mark()
        cell.inject(ctx)
        w.wait_acked(200, 10)
        run.control("/approve")
        _outcome(cell, ctx)
    elif cell.phase == "Cutover":
        if cell.inject is kill_migration_after_flip:
            run.control("/approve")
            if run.wait(is_event("cutover"), 30) is None:
                raise RuntimeError("no cutover to kill after")
            ctx.fault_at = run.mark()
            cell.inject(ctx)
            back = run.wait(is_event("route_out", "awaiting_approval", "cutover_aborted"), 30)
            ctx.notes.append("after the restart: " + (str(back.get("event")) if back else "nothing within 30 s"))
            if back is not None and back.get("event") == "awaiting_approval":
                # resumed in Sync although it had flipped: approve once more and see where it goes
                r = run.control("/approve")
                went_on = is_event("route_out", "cutover", "cutover_aborted")
                again = run.wait(lambda e: went_on(e) or is_phase("Failed")(e), 20)
                ctx.notes.append(f"approved again ({r.get('http_error') or 'accepted'}): "
                                 + (str(again.get("event")) if again else "nothing within 20 s"))
            ctx.writers.wait_acked(200, 10)
        else:
            ctx.fault_at = run.mark()
            run.control("/approve")
            cell.inject(ctx)   # approve, then the fault: it lands inside or right after the first attempt
            cut = run.seen(is_event("cutover"), ctx.fault_at)
            if cut is not None:
                ctx.notes.append("the cutover finished before the fault took effect")
            _outcome(cell, ctx)
    elif cell.phase == "RouteOut":
        run.control("/approve")
        if run.wait(is_event("cutover"), 30) is None:
            raise RuntimeError("no cutover")
        w.wait_acked(200, 10)
        ctx.fault_at = run.mark()
        cell.inject(ctx)
        w.wait_acked(200, 10)
        run.wait(notable, 5)   # give the tool a moment to react
    elif cell.phase == "Rollback":
        run.control("/approve")
        if run.wait(is_event("cutover"), 30) is None:
            raise RuntimeError("no cutover")
        w.wait_acked(200, 10)
        ctx.fault_at = run.mark()
        r = run.control("/rollback")
        if "http_error" in r:
            ctx.notes.append(f"rollback refused: {r}")
        cell.inject(ctx)
        if run.wait(lambda e: e.get("event") == "rolled_back" or is_phase("Failed")(e), 30) is None:
            ctx.notes.append("no rollback within 30 s")
        w.wait_acked(100, 5)
    else:
        raise ValueError(cell.phase)


def _outcome(cell: Cell, ctx: Ctx) -> None:
    """After approval: wait for the cutover, a failure, or (refuse cells) the tool holding off."""
    run = ctx.run
    patience = cell.refuse_wait if cell.expect == "refuse" else cell.outcome_wait
    e = run.wait(lambda e: e.get("event") == "cutover" or is_phase("Failed")(e), patience)
    if cell.expect == "refuse" and ctx.others:
        # The direct writer leaves; a tool that held off may now (re-check, repair and) cut over.
        ctx.fault_cleared_at = run.mark()
        for o in ctx.others:
            o.stop()
        if e is None:
            run.wait(lambda e: e.get("event") == "cutover" or is_phase("Failed")(e), cell.refuse_wait + 5)
    elif cell.expect == "refuse":
        ctx.fault_cleared_at = run.mark()
    ctx.writers.wait_acked(100, 5)  # writes go on after the outcome, to whichever side is authoritative


def run_cell(cell: Cell, keep_logs: Path | None = None) -> Result:
    """One cell, start to end; ``keep_logs``: where a failing cell's events, state and stderr are kept."""
    res = Result(cell.fault, cell.phase, cell.expect)
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="durablecache-fault-"))
    source = LocalServer(engine=SOURCE_ENGINE, elasticache=RESTRICTED)
    target = aof_server(TARGET_ENGINE, RESTRICTED) if cell.target_aof else \
        LocalServer(engine=TARGET_ENGINE, elasticache=RESTRICTED)
    proxy: FaultProxy | None = None
    run: MigrationRun | None = None
    writers: LedgerWorkload | None = None
    ctx: Ctx | None = None
    try:
        source.start()
        target.start()
        if RESTRICTED:
            assert_restricted(source, target)
        c = client(source)
        seed(c, cell.seed_keys)
        c.close()
        target_url = target.url()
        if cell.proxy_side == "target":
            proxy = FaultProxy(target.port).start()
            target_url = f"valkey://127.0.0.1:{proxy.port}"
        extra = ["--max-ops", "20000"] if cell.phase == "Copy" else []
        run = MigrationRun(source.url(), target_url, workdir, extra).start()
        if run.wait(is_event("proxies"), 60) is None:
            raise RuntimeError(f"the migration never served: {run.stderr_tail()}")
        writers = LedgerWorkload(run.listen, writers=3, rate=150).start()
        ctx = Ctx(source, target, run, writers, proxy)
        _drive(cell, ctx)
    except Exception as exc:  # noqa: BLE001 - a cell that breaks is reported as such, the matrix goes on
        res.why = f"harness: {type(exc).__name__}: {str(exc)[:150]}"
    finally:
        for w in [*(ctx.others if ctx else []), *([writers] if writers else [])]:
            w.stop()
    try:
        if run is not None and writers is not None and ctx is not None:
            _judge(cell, ctx, res)
    except Exception as exc:  # noqa: BLE001
        res.why = res.why or f"oracle: {type(exc).__name__}: {str(exc)[:150]}"
        res.ok = False
    finally:
        if run is not None:
            run.stop()
        if proxy is not None:
            proxy.stop()
        for s in (source, target):
            with contextlib.suppress(Exception):
                kill_server(s)
            s.stop()
        if keep_logs is not None and not res.ok:
            dest = keep_logs / re.sub(r"[^\w@.-]+", "_", cell.name)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns("token"))
            if run is not None:
                (dest / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in run.since(0)))
        shutil.rmtree(workdir, ignore_errors=True)
    res.seconds = round(time.monotonic() - t0, 1)
    return res


def assert_restricted(*servers: LocalServer) -> None:
    """The cell's servers really refuse what ElastiCache refuses (a harness that silently ran plain
    servers would prove nothing)."""
    for server in servers:
        c = client(server)
        try:
            for command in (("CONFIG", "GET", "maxmemory"), ("SAVE",), ("DEBUG", "SLEEP", "0"), ("SYNC",)):
                try:
                    c.execute_command(*command)
                except valkey.ResponseError as exc:
                    if "unknown command" in str(exc):
                        continue
                raise RuntimeError(f"server on port {server.port} runs {command[0]}: not ElastiCache-restricted")
        finally:
            c.close()


def _names(e: Event, what: str, ctx: Ctx) -> bool:
    """Does the event's text name ``what``: a side by that word or by its server's address, or a client?"""
    text = json.dumps(e)
    ports = {"source": ctx.source.port, "target": ctx.target.port}
    return what in text or (what in ports and f"127.0.0.1:{ports[what]}" in text)


def _judge(cell: Cell, ctx: Ctx, res: Result) -> None:
    run = ctx.run
    state = run.state()
    res.flipped = bool(state.get("flipped"))
    # writes that finished; the syncer catches up with the last of them before verify compares
    res.verify = verify(ctx.source, ctx.target, cell.verify_wait)
    auth, other = (ctx.target, ctx.source) if res.flipped else (ctx.source, ctx.target)
    ledgers = [*ctx.writers.ledgers, *(led for o in ctx.others for led in o.ledgers)]
    own_loss = cell.inject is source_restart_empty and cell.phase in ("Copy", "Sync") or \
        cell.inject is target_restart_empty and cell.phase in ("RouteOut", "Rollback")
    sides = [client(auth), client(other)] if own_loss else [client(auth)]
    window = (ctx.crashed_at - CRASH_WINDOW, ctx.crashed_at) if own_loss and ctx.crashed_at else None
    check = check_ledgers(ledgers, sides, ctx.counter_base if own_loss else None, window)
    for s in sides:
        s.close()
    res.acked, res.uncertain, res.lost, res.lost_examples = check.acked, check.uncertain, check.n_lost, check.lost[:5]
    res.crash_lost = len(check.crash_lost)
    events = run.since(ctx.fault_at)
    names = {ctx.source.port: "source", ctx.target.port: "target", run.listen: "proxy"}
    if ctx.proxy:
        names[ctx.proxy.port] = "target(via fault proxy)"
    res.said = _said(run.since(0), run, ctx.notes, names)
    if res.why:
        return
    problems: list[str] = []
    crash = re.search(r"error: ([A-Z]\w*(Error|Exception)): ", run.stderr_tail(400))
    if crash:   # not a refusal (a DurableCacheError is printed without its type): the process broke
        problems.append(f"migrate died of {crash.group(1)}")
    if res.lost:
        problems.append(f"{res.lost} acked writes lost" + (" (on both sides)" if own_loss else ""))
    if cell.expect == "no-loss":
        if res.verify != "equal":
            problems.append("sides differ")
        if state.get("phase") == "Failed" and not crash:   # a fault it should ride out ended the migration
            problems.append(f"migration failed: {str(state.get('message'))[:80]}")
    else:
        end = None if ctx.fault_cleared_at is None else ctx.fault_cleared_at - ctx.fault_at
        during = events[:end]
        if any(_went_on(e, during) for e in during):
            problems.append("went on while the fault stood")
        if not any(notable(e) for e in during):
            problems.append("said nothing")
        elif cell.must_name and not any(notable(e) and _names(e, cell.must_name, ctx) for e in events):
            problems.append(f"never named the {cell.must_name}")
    res.ok = not problems
    res.why = "; ".join(problems)


def _went_on(e: dict[str, Any], during: list[dict[str, Any]]) -> bool:
    """A cutover, or a rollback that trusted the faulted side, while the fault stood.

    A rollback that first announced ``rollback_restores`` (the target changed after FLIP, so the repair
    keeps what only the source holds instead of deleting it) did not go on blindly: that is the
    outcome docs/protocol.md asks for, and completing it loses nothing.
    """
    if e.get("event") == "cutover":
        return True
    if e.get("event") != "rolled_back":
        return False
    before = during[:during.index(e)]
    return not any(b.get("event") == "rollback_restores" for b in before)


# -- the matrix -----------------------------------------------------------------------------------
def all_cells() -> list[Cell]:
    cells: list[Cell] = []
    for phase in PHASES:
        expect = "refuse" if phase in ("RouteOut", "Rollback") else "no-loss"
        cells.append(Cell("target restarted empty", phase, target_restart_empty, expect=expect,
                          seed_keys=50_000 if phase == "Copy" else 2000,
                          must_name="target" if expect == "refuse" else None))
    for phase in ("Copy", "Sync", "Cutover", "RouteOut", "Rollback"):
        cells.append(Cell("target restarted with its data (AOF)", phase, target_restart_data, target_aof=True,
                          seed_keys=50_000 if phase == "Copy" else 2000))
    cells.append(Cell("source restarted empty", "Sync", source_restart_empty, expect="refuse", must_name="source"))
    for phase in ("Copy", "Sync", "Cutover", "RouteOut", "Rollback"):
        cells.append(Cell("network to target cut 2 s", phase, net_cut, proxy_side="target",
                          seed_keys=50_000 if phase == "Copy" else 2000))
    for phase in ("Sync", "Cutover"):
        cells.append(Cell("network to target +30 ms", phase, net_delay, proxy_side="target"))
        cells.append(Cell("target reply dropped mid-reply", phase, net_drop_mid_reply, proxy_side="target"))
    for phase in ("Sync", "Cutover", "RouteOut", "Rollback"):
        cells.append(Cell("target refuses writes (NOREPLICAS)", phase, target_refuses_writes))
    cells.append(Cell("migration SIGKILLed after FLIP, restarted", "Cutover", kill_migration_after_flip))
    cells.append(Cell("client writing directly to the source", "Sync", direct_writer, expect="refuse",
                      must_name="billing-cron"))
    cells.append(Cell("EVAL flushdb through the proxy", "Sync", scripted_flushdb))
    return cells


def find(fault_prefix: str, phase: str) -> Cell:
    return next(c for c in all_cells() if c.fault.startswith(fault_prefix) and c.phase == phase)
