"""A migration's settings: ``MigrationOptions``, with every default and every check in one place.

Two runtimes build them: the CLI from its flags (commands/migrate.py) and the operator's worker from the
DurableCache spec (k8s/spec.py). Both take their defaults from here, and the CRD's schema defaults are
checked against them (tests/test_spec.py), so no default is written twice. Durations have one format
for both: Go's (``100ms``, ``1m30s``, ``2h``), which the CRD's schema also enforces; the CLI also takes
plain seconds (``0.5``).
"""

from __future__ import annotations

import dataclasses
import re

from .errors import UsageError
from .keymover import DEFAULT_BIG_KEY_BYTES
from .laggovernor import READ_INTERVAL, LagReader
from .movers import DEFAULT_TARGET_BYTES_PER_PRIMARY

# The CRD's pattern for every duration field (tests/test_spec.py keeps them equal).
GO_DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PLAIN = re.compile(r"[0-9]+(\.[0-9]+)?")

MIN_WRITE_PAUSE = 0.001
MAX_WRITE_PAUSE_LIMIT = 30.0        # the worker pod's termination grace (60 s) must outlast a cutover
ROLLBACK_WINDOW_LIMIT = 168 * 3600.0
# RouteIn in the operator waits for people and rollouts (workloads restarted onto the proxy), not for
# one shell: the worker's gate timeout is an hour, the CLI's five minutes (MigrationOptions).
OPERATOR_GATE_TIMEOUT = 3600.0
# The operator cuts over only when approved unless the spec says auto (the CRD's default); the CLI,
# run by someone watching it, cuts over when in sync unless --cutover manual.
OPERATOR_CUTOVER = "manual"
# After the end the CLI keeps proxying (as it always did); the operator moves the applications to the
# target unless spec.endpoint.afterCutover says proxy.
OPERATOR_AFTER_CUTOVER = "target"

# Where each checked setting comes from, for error messages: (spec field, CLI flag).
SETTING_NAMES = {
    "cutover": ("spec.cutover.mode", "--cutover"),
    "after_cutover": ("spec.endpoint.afterCutover", "--after-cutover"),
    "max_write_pause": ("spec.cutover.maxWritePause", "--max-write-pause"),
    "drain_budget": ("spec.cutover.drainBudget", "--drain-budget"),
    "max_key_pause": ("spec.cutover.maxKeyPause", "--max-key-pause"),
    "rollback_window": ("spec.cutover.rollbackWindow", "--rollback-window"),
    "gate_settle": ("spec.routeIn.settlePeriod", "--gate-settle"),
    "gate_timeout": ("the gate timeout", "--gate-timeout"),
    "repair_max_share": ("spec.repair.maxDestructiveShare", "--repair-max-share"),
    "max_source_ops": ("the source's rate limit", "--max-ops"),
    "epoch": ("the coordinator's lease epoch", "--epoch"),
    "connection_budget": ("spec.proxy.connectionBudget", "--connection-budget"),
}


def parse_duration(text: str, what: str = "duration") -> float:
    """'100ms', '1m30s', '2h', '1.5s' (Go's format, as in the CRD) or plain seconds ('0.5') -> seconds."""
    value = text.strip()
    if _PLAIN.fullmatch(value):
        return float(value)
    parts = _PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise UsageError(f"{what}: not a duration: {text!r} (use e.g. 100ms, 30s, 1m30s, 2h)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """Seconds as the shortest duration text parse_duration reads back (for help texts and messages)."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms"


class OptionError(UsageError):
    """A setting out of range. ``field`` is the MigrationOptions field; ``problem`` may name other
    settings as ``{field_name}``. The message names them as the CLI's flags; ``for_spec`` as the
    DurableCache's fields."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(self.named(1))

    def named(self, which: int) -> str:
        """The message with the settings named as spec fields (0) or CLI flags (1)."""
        names = {f: pair[which] for f, pair in SETTING_NAMES.items()}
        return f"{names.get(self.field, self.field)} {self.problem.format(**names)}"


@dataclasses.dataclass
class MigrationOptions:
    cutover: str = "auto"  # auto | manual (the operator's default: OPERATOR_CUTOVER)
    max_write_pause: float = 0.1  # seconds: freeze + drain + flip must fit, or the cutover aborts
    # seconds the DRAIN step may take inside the write pause (an attempt that cannot drain quickly then
    # aborts sooner); None: what is left of max_write_pause once FREEZE returned. Rollback ignores it.
    drain_budget: float | None = None
    # seconds: before the global freeze, writes to keys too slow to copy inside max_write_pause (hot
    # big keys) are held on their own until the syncer copied them; longer, and the attempt aborts.
    max_key_pause: float = 5.0
    rollback_window: float = 1800.0
    # How long the source must show no client but ours before the copy starts. 30 s for both runtimes:
    # the gate is there to catch writers that connect now and then (a lazily reconnecting pool, a cron
    # job), which a 2 s look misses; it delays the start of a migration that runs for minutes anyway,
    # never the write pause. Tests and the demo pass shorter ones.
    gate_settle: float = 30.0
    gate_timeout: float = 300.0  # the operator's worker: OPERATOR_GATE_TIMEOUT
    allow_clients: list[str] = dataclasses.field(default_factory=list)
    ready_backlog: int = 200  # try a cutover once the dirty backlog is below this
    cutover_attempts: int = 20
    exit_after_cutover: bool = False
    # What the applications use once the migration ends (Complete, RolledBack): "proxy" keeps the
    # proxies serving as plain front ends (no marks, no syncer), also after a restart; "target" stops
    # them (the applications were moved to the side itself). The CLI keeps proxying, the operator's
    # spec.endpoint.afterCutover defaults to target.
    after_cutover: str = "proxy"
    copy_concurrency: int = 8
    scan_count: int = 1000
    big_key_bytes: int = DEFAULT_BIG_KEY_BYTES
    max_source_ops: float | None = None
    max_target_bytes: float | None = DEFAULT_TARGET_BYTES_PER_PRIMARY
    sync_workers: int = 4
    verify_in_sync: bool = True  # a full verify-and-repair pass when Sync begins
    max_dirty: int = 2_000_000
    watch_interval: float = 1.0  # seconds between looks at both sides' identities and the source's clients
    # A repair that would delete or overwrite more than this share of the side it writes (and more
    # than repair_min_keys keys) stops and asks, unless accepted (control API / accept_destructive_repair).
    repair_max_share: float = 0.05
    repair_min_keys: int = 100
    accept_destructive_repair: bool = False
    # An async-durable target's DurabilityLag, from the provider (laggovernor.py): writes slow down
    # before the target refuses them. None: no governor.
    target_lag: LagReader | None = None
    lag_interval: float = READ_INTERVAL
    # The coordinator's fencing epoch (docs/ha.md): every instruction to a proxy carries it, and a proxy
    # that has seen a newer one refuses it. The operator's worker sets it from its Lease; the CLI: --epoch.
    epoch: int = 0
    # The connections a cutover attempt may have open on any one server of the side it flips to, for
    # each proxy's PREPARE check (proxy/server.py _check_budget); 0: 90% of that server's maxclients.
    connection_budget: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every range check, whoever built the options (the CRD checks the same for the operator)."""
        if self.after_cutover not in ("proxy", "target"):
            raise OptionError("after_cutover", f"must be proxy or target, not {self.after_cutover!r}")
        if self.cutover not in ("auto", "manual"):
            raise OptionError("cutover", f"must be auto or manual, not {self.cutover!r}")
        if not MIN_WRITE_PAUSE <= self.max_write_pause <= MAX_WRITE_PAUSE_LIMIT:
            raise OptionError("max_write_pause", f"must be between {format_duration(MIN_WRITE_PAUSE)} and "
                              f"{format_duration(MAX_WRITE_PAUSE_LIMIT)}, not {self.max_write_pause:g}s")
        if self.drain_budget is not None and not 0 <= self.drain_budget <= self.max_write_pause:
            raise OptionError("drain_budget", f"({self.drain_budget * 1000:g} ms) must not exceed {{max_write_pause}} "
                              f"({self.max_write_pause * 1000:g} ms): the drain happens inside the write pause")
        if self.max_key_pause < 0:
            raise OptionError("max_key_pause", f"must not be negative, not {self.max_key_pause:g}s")
        if not 0 <= self.rollback_window <= ROLLBACK_WINDOW_LIMIT:
            raise OptionError("rollback_window", f"must be between 0 and {format_duration(ROLLBACK_WINDOW_LIMIT)}, "
                              f"not {self.rollback_window:g}s")
        if self.gate_settle < 0:
            raise OptionError("gate_settle", f"must not be negative, not {self.gate_settle:g}s")
        if self.gate_timeout <= 0:
            raise OptionError("gate_timeout", f"must be more than 0, not {self.gate_timeout:g}s")
        if not 0 <= self.repair_max_share <= 1:
            raise OptionError("repair_max_share", f"must be between 0 and 1, not {self.repair_max_share:g}")
        if self.epoch < 0:
            raise OptionError("epoch", f"must not be negative, not {self.epoch}")
        if self.connection_budget < 0:
            raise OptionError("connection_budget", f"must not be negative, not {self.connection_budget}")
        if self.max_source_ops is not None and self.max_source_ops <= 0:
            raise OptionError("max_source_ops", f"must be more than 0, not {self.max_source_ops:g}")

    @property
    def drain_limit(self) -> float:
        """The most a cutover's DRAIN may take: the drain budget when set, else the write pause."""
        return self.max_write_pause if self.drain_budget is None else min(self.max_write_pause, self.drain_budget)


DEFAULTS = MigrationOptions()
