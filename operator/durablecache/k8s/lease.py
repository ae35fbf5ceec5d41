"""The coordinator's Lease: one `durablecache worker` per DurableCache acts at a time, with a fencing epoch.

A ``coordination.k8s.io/v1`` Lease named after the DurableCache (owned by it, so the garbage collector
deletes it with it) says who coordinates the migration. The *epoch* is ``spec.leaseTransitions``: every
change of holder is a replace carrying the resourceVersion the contender read, so of two contenders
only one write is accepted (the other gets 409) and the epoch strictly increases with every holder.

Timing (``LeaseTimings``): a contender takes a lease over once it has seen the same record, unrenewed,
for ``duration`` seconds on its own clock (it never compares the holder's timestamps with its clock).
The holder counts from the *start* of its last successful renewal, which is before any contender can
have seen that renewal, and stops acting once ``renew_deadline`` has passed without a new one. So the
holder stops at least ``duration - renew_deadline`` (the margin) before anyone can take over: the
margin covers stopping the migration and clock-rate differences between hosts. Renewals run on their
own thread and their own API client, so a busy event loop or a hung status write never delays them.

``valid()`` is a pure clock comparison: code that acts (the status writer) asks it right before it
acts, even if the renewing thread has not yet noticed the loss.
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError

from .. import logs
from ..errors import DurableCacheError
from . import API_VERSION, GROUP, KIND

log = logs.get("durablecache.k8s.lease")
# client-go's leader-election defaults: a 5 s margin between the holder stopping and a takeover.
DEFAULT_DURATION = 15
DEFAULT_RENEW_DEADLINE = 10.0
DEFAULT_RETRY_PERIOD = 2.0
# What an unreachable or failing API server raises (urllib3's errors are not all OSErrors).
API_ERRORS = (ApiException, OSError, HTTPError)


class LeaseLost(DurableCacheError):
    """The coordinator lease is gone (not renewed in time, or taken): this process must stop acting."""

    exit_code = 3


@dataclass(frozen=True)
class LeaseTimings:
    duration: int = DEFAULT_DURATION                 # leaseDurationSeconds (whole seconds in the API)
    renew_deadline: float = DEFAULT_RENEW_DEADLINE   # the holder stops acting this long after its last renewal
    retry_period: float = DEFAULT_RETRY_PERIOD       # between renewals, and between a contender's looks

    def check(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError("lease timings need 0 < retry period < renew deadline < duration "
                             f"(got {self.retry_period}, {self.renew_deadline}, {self.duration})")

    @property
    def margin(self) -> float:
        return self.duration - self.renew_deadline


def holder_identity() -> str:
    """The pod's name (POD_NAME from the downward API, else HOSTNAME, which Kubernetes sets to it) plus a
    random suffix: a restarted container in the same pod is a new holder with a new epoch."""
    base = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{base}-{secrets.token_hex(4)}"


def lease_name(obj: dict[str, Any]) -> str:
    return f"{obj['metadata']['name']}-coordinator"


def micro_time() -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Record:
    resource_version: str
    holder: str | None
    transitions: int
    duration: int


class CoordinatorLease:
    """Acquire, renew and release one DurableCache's coordinator lease. Not for use from two threads at
    once: ``acquire`` runs first (on one thread), then the renewing thread, then ``release``."""

    def __init__(self, api: k8s.ApiClient, obj: dict[str, Any], holder: str, timings: LeaseTimings,
                 clock: Callable[[], float] = time.monotonic):
        timings.check()
        self.api = k8s.CoordinationV1Api(api)
        self.namespace, self.owner = obj["metadata"]["namespace"], obj["metadata"]["name"]
        self.uid = obj["metadata"].get("uid")
        self.name = lease_name(obj)
        self.holder = holder
        self.timings = timings
        self.clock = clock
        self.epoch = 0
        self.acquired_at = 0.0     # wall clock, for logs and tests comparing processes
        self._rv = ""
        self._held_until = 0.0     # monotonic: the holder may act until then
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_reason: str | None = None
        self._lost_lock = threading.Lock()

    # -- reading and writing the Lease ---------------------------------------------------------------
    def _read(self, timeout: float) -> Record | None:
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        spec = lease.spec
        return Record(lease.metadata.resource_version, spec.holder_identity or None, int(spec.lease_transitions or 0),
                      int(spec.lease_duration_seconds or self.timings.duration))

    def _body(self, epoch: int, acquire_time: str, resource_version: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name, "namespace": self.namespace,
            "labels": {"app.kubernetes.io/managed-by": "durablecache", f"{GROUP}/name": self.owner}}
        if self.uid:
            # No blockOwnerDeletion: that would need update on durablecaches/finalizers, a right the
            # worker does not otherwise need.
            meta["ownerReferences"] = [{"apiVersion": API_VERSION, "kind": KIND, "name": self.owner, "uid": self.uid}]
        if resource_version:
            meta["resourceVersion"] = resource_version   # the precondition: 409 if anyone wrote since
        now = micro_time()
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
                "spec": {"holderIdentity": self.holder, "leaseDurationSeconds": self.timings.duration,
                         "acquireTime": acquire_time, "renewTime": now, "leaseTransitions": epoch}}

    def _take(self, current: Record | None, floor: int, started: float, timeout: float) -> bool:
        """Create the Lease or replace a free/expired one as ours; False when another write won."""
        epoch = max(current.transitions if current else 0, floor) + 1
        body = self._body(epoch, micro_time(), current.resource_version if current else None)
        try:
            if current is None:
                out = self.api.create_namespaced_lease(self.namespace, body, _request_timeout=timeout)
            else:
                out = self.api.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status == 409:      # another contender (or the holder renewing) wrote first
                return False
            raise
        self.epoch, self._rv = epoch, out.metadata.resource_version
        self._held_until = started + self.timings.renew_deadline
        self.acquired_at = time.time()
        return True

    # -- acquiring ----------------------------------------------------------------------------------
    def acquire(self, floor: int = 0, timeout: float | None = None) -> int:
        """Block until this process holds the lease; returns the epoch. ``floor``: the highest epoch
        known elsewhere (status.coordinator.epoch), so a Lease deleted by hand never restarts the epochs
        below what proxies have already seen. ``timeout`` None waits for as long as the holder lives
        (a standby coordinator)."""
        t = self.timings
        deadline = None if timeout is None else self.clock() + timeout
        observed: tuple[str, float] | None = None   # (resourceVersion, when we first saw it)
        waiting_logged: str | None = None
        while deadline is None or self.clock() < deadline:
            started = self.clock()
            try:
                current = self._read(t.renew_deadline)
                if current is None or current.holder is None or current.holder == self.holder:
                    free = True
                else:
                    if observed is None or observed[0] != current.resource_version:
                        observed = (current.resource_version, started)
                    free = started - observed[1] >= current.duration
                if free and self._take(current, floor, started, t.renew_deadline):
                    log.info("coordinator lease acquired", lease=self.name, holder=self.holder, epoch=self.epoch,
                             previous=current.holder if current else None, at=self.acquired_at)
                    return self.epoch
                if current is not None and current.holder is not None and current.holder != waiting_logged:
                    waiting_logged = current.holder
                    log.info("coordinator lease held by another worker: waiting", lease=self.name,
                             holder=current.holder, epoch=current.transitions, me=self.holder)
            except API_ERRORS as exc:   # look again later
                log.warning("coordinator lease not read", lease=self.name, error=str(exc)[:200])
            self._stop.wait(t.retry_period)
            if self._stop.is_set():
                break
        raise LeaseLost(f"the coordinator lease {self.namespace}/{self.name} was not acquired in time")

    # -- holding ------------------------------------------------------------------------------------
    def valid(self) -> bool:
        """True while this process may act: acquired, and renewed within the renew deadline."""
        return self.lost_reason is None and self.clock() < self._held_until

    @property
    def deadline_reason(self) -> str:
        return f"not renewed within the renew deadline ({self.timings.renew_deadline:g}s)"

    def remaining(self) -> float:
        return self._held_until - self.clock()

    def start_renewing(self, on_lost: Callable[[str], None]) -> None:
        """Renew every retry period on a thread of its own; ``on_lost(reason)`` once the lease is lost
        (called from that thread)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, args=(on_lost,), name="coordinator-lease",
                                        daemon=True)
        self._thread.start()

    def _renew_loop(self, on_lost: Callable[[str], None]) -> None:
        t = self.timings
        # Wake at the deadline at the latest, so a loss is reported when it happens, not a period later.
        while not self._stop.wait(max(0.0, min(t.retry_period, self.remaining()))):
            reason = self._renew_once()
            if reason is None and self.clock() >= self._held_until:
                reason = self.deadline_reason
            if reason:
                if self.declare_lost(reason):
                    on_lost(reason)
                return

    def declare_lost(self, reason: str) -> bool:
        """Record the loss (once, whoever notices first: this thread or the worker's own deadline
        watch); True the first time."""
        with self._lost_lock:
            if self.lost_reason is not None:
                return False
            self.lost_reason = reason
        log.error("coordinator lease lost", lease=self.name, holder=self.holder, epoch=self.epoch,
                  reason=reason, at=time.time())
        return True

    def _renew_once(self) -> str | None:
        """One renewal; a reason when the lease is definitely someone else's, else None (renewed, or
        failed for now: the deadline decides)."""
        started = self.clock()
        try:
            for _ in range(2):   # a 409 from a write that left us holding (labels, owner): once more
                budget = self._held_until - self.clock()
                if budget <= 0:
                    return None
                body = self._body(self.epoch, self._acquired_iso, self._rv)
                try:
                    out = self.api.replace_namespaced_lease(self.name, self.namespace, body,
                                                            _request_timeout=budget)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    current = self._read(max(0.05, self._held_until - self.clock()))
                    if current is None:
                        return "the Lease was deleted"
                    if current.holder != self.holder or current.transitions != self.epoch:
                        return f"taken by {current.holder} (epoch {current.transitions})"
                    self._rv = current.resource_version
                    continue
                self._rv = out.metadata.resource_version
                self._held_until = started + self.timings.renew_deadline
                return None
        except API_ERRORS as exc:   # the deadline decides
            log.warning("coordinator lease not renewed", lease=self.name, error=str(exc)[:200],
                        remaining=round(self.remaining(), 2))
        return None

    @property
    def _acquired_iso(self) -> str:
        return datetime.datetime.fromtimestamp(self.acquired_at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timings.renew_deadline + 1)

    def release(self) -> None:
        """Give the lease up (after everything stopped acting), so a successor need not wait a lease
        duration. Best effort: an unreachable API server just means the successor waits."""
        self.stop_renewing()
        if not self.valid():
            return
        self._held_until = 0.0
        try:
            body = self._body(self.epoch, self._acquired_iso, self._rv)
            body["spec"]["holderIdentity"] = None
            self.api.replace_namespaced_lease(self.name, self.namespace, body,
                                              _request_timeout=self.timings.renew_deadline)
            log.info("coordinator lease released", lease=self.name, holder=self.holder, epoch=self.epoch)
        except API_ERRORS as exc:
            log.warning("coordinator lease not released", lease=self.name, error=str(exc)[:200])
