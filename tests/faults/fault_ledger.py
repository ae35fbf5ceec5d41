"""The ledger workload of the fault matrix: writers that remember every acknowledged write, and a
checker that lists every acknowledged write missing or wrong on a side.

Each writer (a thread with its own synchronous client) alternates:
- ``SET ledger:{w}:{seq} v{seq}`` — a key written once, so the expected value is exact;
- ``INCRBY ledger:ctr:{w % COUNTERS} n`` — a few shared counters, with the acknowledged total kept.

A write whose reply is an error or never arrives (timeout, connection dropped) is *uncertain*: it
may or may not have been applied. Only acknowledged writes count; an uncertain key is not checked, an
uncertain increment widens the counter's allowed range.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import valkey
from valkey.backoff import NoBackoff
from valkey.retry import Retry

from durablecache.testing.waiting import wait_for

PREFIX = "ledger"
COUNTERS = 3


@dataclasses.dataclass
class WriterLedger:
    keys: dict[str, str] = dataclasses.field(default_factory=dict)       # acknowledged SETs
    acked_at: dict[str, float] = dataclasses.field(default_factory=dict)  # key -> time.monotonic() of its reply
    uncertain_keys: set[str] = dataclasses.field(default_factory=set)
    incr_acked: dict[str, int] = dataclasses.field(default_factory=dict)  # counter -> acknowledged total
    incr_uncertain: dict[str, int] = dataclasses.field(default_factory=dict)
    acked: int = 0
    uncertain: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)     # first words of error replies


@dataclasses.dataclass
class Check:
    acked: int
    uncertain: int
    lost: list[str]
    crash_lost: list[str] = dataclasses.field(default_factory=list)

    @property
    def n_lost(self) -> int:
        return len(self.lost)


class LedgerWorkload:
    """``writers`` threads writing to 127.0.0.1:``port`` (the proxy's listen address, or the source
    itself for a direct writer), about ``rate`` writes/s each, until ``stop()``."""

    def __init__(self, port: int, *, writers: int = 3, rate: float = 200.0, name: str = "w",
                 client_name: str | None = None, timeout: float = 3.0):
        self.port = port
        self.n = writers
        self.rate = rate
        self.name = name
        self.client_name = client_name
        self.timeout = timeout
        self.ledgers = [WriterLedger() for _ in range(writers)]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def acked(self) -> int:
        return sum(x.acked for x in self.ledgers)

    @property
    def uncertain(self) -> int:
        return sum(x.uncertain for x in self.ledgers)

    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for led in self.ledgers:
            for k, v in led.errors.items():
                out[k] = out.get(k, 0) + v
        return out

    def start(self) -> LedgerWorkload:
        self._threads = [threading.Thread(target=self._writer, args=(i,), name=f"ledger-{self.name}{i}", daemon=True)
                         for i in range(self.n)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def wait_acked(self, more: int, timeout: float) -> bool:
        """Bounded wait until ``more`` further writes were acknowledged."""
        goal = self.acked + more
        try:
            wait_for(f"{more} more acknowledged writes", lambda: self.acked >= goal, timeout)
        except AssertionError:      # a stalled load is an outcome the cell records, not an error here
            return False
        return True

    def _client(self) -> valkey.Valkey:
        c = valkey.Valkey(host="127.0.0.1", port=self.port, socket_timeout=self.timeout,
                          socket_connect_timeout=2, retry_on_timeout=False, retry=Retry(NoBackoff(), 0))
        if self.client_name:
            c.client_setname(self.client_name)
        return c

    def _writer(self, w: int) -> None:
        led = self.ledgers[w]
        tag = f"{self.name}{w}"
        interval = 1.0 / self.rate if self.rate else 0.0
        client: valkey.Valkey | None = None
        seq = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            seq += 1
            try:
                if client is None:
                    client = self._client()
            except (valkey.ValkeyError, OSError) as exc:
                led.errors[type(exc).__name__] = led.errors.get(type(exc).__name__, 0) + 1
                client = None
                self._stop.wait(0.05)
                continue
            if seq % 3:
                key, value = f"{PREFIX}:{tag}:{seq}", f"v{seq}"
                try:
                    client.set(key, value)
                    led.keys[key] = value
                    led.acked_at[key] = time.monotonic()
                    led.acked += 1
                except (valkey.ValkeyError, OSError) as exc:
                    led.uncertain_keys.add(key)
                    led.uncertain += 1
                    client = self._failed(client, led, exc)
            else:
                ctr, by = f"{PREFIX}:ctr:{(w + seq) % COUNTERS}", seq % 7 + 1
                try:
                    client.incrby(ctr, by)
                    led.incr_acked[ctr] = led.incr_acked.get(ctr, 0) + by
                    led.acked += 1
                except (valkey.ValkeyError, OSError) as exc:
                    led.incr_uncertain[ctr] = led.incr_uncertain.get(ctr, 0) + by
                    led.uncertain += 1
                    client = self._failed(client, led, exc)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()
        if client is not None:
            _close(client)

    def _failed(self, client: valkey.Valkey, led: WriterLedger, exc: Exception) -> valkey.Valkey | None:
        word = str(exc).split(" ", 1)[0] if isinstance(exc, valkey.ResponseError) else type(exc).__name__
        led.errors[word] = led.errors.get(word, 0) + 1
        if isinstance(exc, valkey.ResponseError):
            self._stop.wait(0.01)
            return client  # the connection is fine, the server said no
        _close(client)
        self._stop.wait(0.05)
        return None

    # -- the oracle -------------------------------------------------------------------------------
    def check(self, sides: list[valkey.Valkey]) -> Check:
        """Every acknowledged write missing or wrong. With several sides, a write counts as present if
        any side has it (used only where the authoritative server itself dropped its data)."""
        return check_ledgers(self.ledgers, sides)


def counter_totals(ledgers: list[WriterLedger]) -> dict[str, int]:
    """The acknowledged total of every counter so far."""
    out: dict[str, int] = {}
    for led in ledgers:
        for c, n in list(led.incr_acked.items()):
            out[c] = out.get(c, 0) + n
    return out


def check_ledgers(ledgers: list[WriterLedger], sides: list[valkey.Valkey],
                  counter_base: dict[str, int] | None = None, crash_window: tuple[float, float] | None = None) -> Check:
    """Every acknowledged write missing or wrong on ``sides`` (present on any of them is enough).

    ``counter_base``: where a server that was authoritative lost its data in a crash, the increments
    it acknowledged before are gone with it (and no side can keep a counter that is written on); only
    the increments acknowledged after the fault, ``total - base``, must be there.
    ``crash_window`` (monotonic start, end): a missing key acknowledged then — by the server that crashed,
    just before its crash, faster than any copy — goes to ``crash_lost`` instead of ``lost``."""
    lost: list[str] = []
    crash_lost: list[str] = []
    acked_at: dict[str, float] = {}
    for led in ledgers:
        acked_at.update(led.acked_at)
    expected: dict[str, str] = {}
    for led in ledgers:
        expected.update(led.keys)
    keys = sorted(expected)
    found: dict[str, bytes | None] = dict.fromkeys(keys)
    for side in sides:
        missing = [k for k in keys if found[k] != expected[k].encode()]
        for i in range(0, len(missing), 1000):
            chunk = missing[i:i + 1000]
            values: list[bytes | None] = side.mget(chunk)  # type: ignore[assignment]
            for k, v in zip(chunk, values):
                if v == expected[k].encode() or found[k] is None:
                    found[k] = v
    for k in keys:
        if found[k] != expected[k].encode():
            what = f"{k}: expected {expected[k]!r}, found {found[k]!r}"
            at = acked_at.get(k, 0.0)
            if crash_window is not None and crash_window[0] <= at <= crash_window[1]:
                crash_lost.append(what)
            else:
                lost.append(what)
    acked_ctr: dict[str, int] = {}
    unsure_ctr: dict[str, int] = {}
    for led in ledgers:
        for c, n in led.incr_acked.items():
            acked_ctr[c] = acked_ctr.get(c, 0) + n
        for c, n in led.incr_uncertain.items():
            unsure_ctr[c] = unsure_ctr.get(c, 0) + n
    for c in sorted(set(acked_ctr) | set(unsure_ctr)):
        lo, hi = acked_ctr.get(c, 0), acked_ctr.get(c, 0) + unsure_ctr.get(c, 0)
        if counter_base is not None:
            lo -= counter_base.get(c, 0)
        got = [int(side.get(c) or 0) for side in sides]  # type: ignore[arg-type]
        if not any(lo <= v <= hi for v in got):
            lost.append(f"{c}: {got}, expected {lo}..{hi}")
    return Check(acked=sum(x.acked for x in ledgers), uncertain=sum(x.uncertain for x in ledgers), lost=lost,
                 crash_lost=crash_lost)


def _close(client: valkey.Valkey) -> None:
    with contextlib.suppress(Exception):  # a broken connection may fail to close; nothing left to do
        client.close()

