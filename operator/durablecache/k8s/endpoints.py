"""The applications' endpoint: a Secret (host, port, tls, url) and/or an ExternalName Service that point
at the source, then the proxy (RouteIn), then the target (RouteOut) — or, with spec.endpoint.afterCutover
proxy, the proxy for good.

Which side the applications must use follows from the migration's phase alone, so the switch is
idempotent: a restarted operator recomputes it and rewrites the same values.
"""

from __future__ import annotations

from typing import Any

from ..phases import PROXIED_PHASES, Phase
from .kube import Kube

# Only these keys of the endpoint Secret are ours; any other key the applications keep there stays.
SECRET_KEYS = ("host", "port", "tls", "url")


def desired_route(phase: Phase | None, state: dict[str, Any], proxy_up: bool,
                  after_cutover: str = "target") -> str | None:
    """"source", "proxy", "target", or None (leave the endpoint as it is). ``after_cutover``
    (spec.endpoint.afterCutover) "proxy": the applications stay on the proxy through RouteOut and
    after Complete, where it serves as a plain front end of the target."""
    flipped = bool(state.get("flipped"))
    if phase in PROXIED_PHASES or (after_cutover == "proxy" and phase in (Phase.ROUTE_OUT, Phase.COMPLETE)):
        # Only once the worker reported its proxy listening: an endpoint nobody answers breaks apps.
        return "proxy" if proxy_up else None
    if phase in (Phase.ROUTE_OUT, Phase.COMPLETE):
        return "target"
    if phase == Phase.ROLLED_BACK:
        return "source"
    if phase == Phase.FAILED:
        # The proxy is gone with the worker: back to whichever side holds the latest writes.
        return "target" if flipped else "source"
    return None


def secret_data(host: str, port: int, tls: bool) -> dict[str, str]:
    scheme = "valkeys" if tls else "valkey"
    return {"host": host, "port": str(port), "tls": "true" if tls else "false", "url": f"{scheme}://{host}:{port}"}


def switch(kube: Kube, obj: dict[str, Any], host: str, port: int, tls: bool) -> bool:
    """Point the Secret and/or Service at host:port. True when anything changed."""
    ns = obj["metadata"]["namespace"]
    endpoint = obj["spec"]["endpoint"]
    changed = False
    if endpoint.get("secretName"):
        changed |= kube.apply_secret(ns, endpoint["secretName"], secret_data(host, port, tls), obj)
    if endpoint.get("serviceName"):
        changed |= kube.apply_external_name(ns, endpoint["serviceName"], host, port, obj)
    return changed


def restart_workloads(kube: Kube, obj: dict[str, Any], reason: str) -> list[str]:
    """Rollout-restart spec.endpoint.restartWorkloads so they reconnect to the new endpoint."""
    ns = obj["metadata"]["namespace"]
    done = []
    for item in obj["spec"]["endpoint"].get("restartWorkloads") or []:
        kube.restart_workload(ns, item["kind"], item["name"], reason)
        done.append(f"{item['kind']}/{item['name']}")
    return done
