"""durablecache operator: the kopf reconciler for DurableCache resources.

JSON logs (with --log-json) for kopf's own messages too, a liveness endpoint at /healthz, Prometheus
metrics at /metrics, and kopf peering so an accidental second instance pauses instead of acting twice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import tempfile
from typing import Any

from .. import logs
from ..errors import UsageError
from ..k8s import READY_TIMEOUT, RECONCILE_INTERVAL
from ..options import format_duration
from ._common import run_async

NAME = "operator"
HELP = "run the Kubernetes operator that reconciles DurableCache resources"
DEFAULT_IMAGE = "ghcr.io/durablecache/durablecache:0.1.0"


def add_arguments(p: argparse.ArgumentParser) -> None:
    peering = p.add_mutually_exclusive_group(required=True)
    peering.add_argument("--peering", metavar="NAME", help="ClusterKopfPeering to coordinate instances through")
    peering.add_argument("--standalone", action="store_true", help="no peering (a single instance, e.g. dev)")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--all-namespaces", action="store_true", help="watch DurableCaches in every namespace")
    scope.add_argument("--namespace", action="append", metavar="NS", help="watch this namespace (repeatable)")
    p.add_argument("--health-port", type=int, default=8080, help="GET /healthz (liveness); 0 disables")
    p.add_argument("--health-host", default="0.0.0.0", help="address of the health endpoint")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics endpoint")
    p.add_argument("--runner", choices=["kubernetes", "local"], default="kubernetes",
                   help="run the proxy/syncer worker as a Deployment (default) or as a local process (tests, dev)")
    p.add_argument("--worker-image", default=os.environ.get("DURABLECACHE_WORKER_IMAGE", DEFAULT_IMAGE),
                   help="image of the worker Deployment (default: $DURABLECACHE_WORKER_IMAGE or %(default)s)")
    p.add_argument("--worker-cluster-role", default=os.environ.get("DURABLECACHE_WORKER_CLUSTER_ROLE"),
                   metavar="CLUSTERROLE",
                   help="give each worker its own ServiceAccount (<name>-durablecache-worker) bound to this "
                        "ClusterRole in the DurableCache's namespace (the chart passes <release>-worker)")
    p.add_argument("--worker-service-account", default=os.environ.get("DURABLECACHE_WORKER_SERVICE_ACCOUNT"),
                   metavar="SA",
                   help="run every worker as this existing service account instead (it needs get on "
                        "durablecaches and the spec's Secrets, patch on durablecaches/status, create on events, "
                        "get/create/update on leases)")
    p.add_argument("--worker-image-pull-secret", action="append", default=[], metavar="SECRET",
                   help="a docker-registry Secret the worker pods pull their image with (repeatable); it "
                        "must exist in each DurableCache's namespace")
    p.add_argument("--local-state-dir", help="where --runner=local keeps worker pids, ports and logs")
    p.add_argument("--local-worker-kubeconfig", default=os.environ.get("DURABLECACHE_LOCAL_WORKER_KUBECONFIG"),
                   metavar="PATH",
                   help="--runner=local: the kubeconfig the workers use (e.g. a token of a ServiceAccount with "
                        "the worker's ClusterRole, as a pod would have); default: the operator's own")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT, metavar="SECONDS",
                   help="how long Provision waits for a new target to become available "
                        f"(default {format_duration(READY_TIMEOUT)})")
    p.add_argument("--interval", type=float, default=RECONCILE_INTERVAL, metavar="SECONDS",
                   help=f"reconcile interval (default {format_duration(RECONCILE_INTERVAL)})")


class _StructlogHandler(logging.Handler):
    """Routes kopf's and the Kubernetes client's stdlib logging through structlog (JSON with --log-json)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = logs.get(record.name)
            extra: dict[str, Any] = {}
            if record.exc_info and record.levelno >= logging.ERROR:
                extra["exc_info"] = record.exc_info
            logger.log(record.levelno, record.getMessage(), **extra)
        except Exception:  # noqa: BLE001 - logging must never take the operator down
            self.handleError(record)


def _route_stdlib_logging(level: str) -> None:
    root = logging.getLogger()
    root.handlers[:] = [_StructlogHandler()]
    root.setLevel(logging.getLevelName(level.upper()) if level != "debug" else logging.DEBUG)
    # kopf is chatty at INFO about every handler run; keep its own level one step quieter.
    logging.getLogger("kopf").setLevel(max(root.level, logging.INFO))
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    import kopf

    from ..k8s.handlers import OperatorContext, build_registry
    from ..k8s.kube import Kube, load_client
    from ..k8s.metrics import Metrics
    from ..k8s.runner import KubernetesRunner, LocalProcessRunner, WorkloadRunner

    if args.worker_cluster_role and args.worker_service_account:
        raise UsageError("--worker-cluster-role and --worker-service-account exclude each other: the first "
                         "makes a ServiceAccount per worker, the second names one for all workers")
    level = _level(args)
    _route_stdlib_logging(level)
    kube = Kube(load_client())
    runner: WorkloadRunner
    if args.runner == "local":
        state = args.local_state_dir or tempfile.mkdtemp(prefix="durablecache-workers-")
        env = None
        if args.local_worker_kubeconfig:    # the worker's identity, not the operator's, as in a pod
            env = {**os.environ, "KUBECONFIG": args.local_worker_kubeconfig}
        runner = LocalProcessRunner(state, env, kube)
    else:
        runner = KubernetesRunner(kube, args.worker_image, args.worker_service_account, args.worker_cluster_role,
                                  args.worker_image_pull_secret)
    metrics = Metrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_host)
    ctx = OperatorContext(kube=kube, runner=runner, metrics=metrics, peering=args.peering,
                          standalone=args.standalone, ready_timeout=args.ready_timeout, interval=args.interval)
    if args.namespace and any(not n for n in args.namespace):
        raise UsageError("--namespace needs a name")
    liveness = f"http://{args.health_host}:{args.health_port}/healthz" if args.health_port else None
    logs.get("durablecache.operator").info(
        "operator starting", peering=args.peering or "standalone", runner=args.runner,
        namespaces=args.namespace or "all", health=liveness, metrics_port=args.metrics_port)
    if args.runner == "kubernetes" and not (args.worker_cluster_role or args.worker_service_account):
        logs.get("durablecache.operator").warning(
            "workers will run as their namespace's default service account, which usually cannot read "
            "the DurableCache; pass --worker-cluster-role (the chart does) or --worker-service-account")
    run_async(_serve(kopf, ctx, build_registry(ctx), args, liveness))
    return 0


def _level(args: argparse.Namespace) -> str:
    # The CLI's --log-level is parsed before the subcommand; it is on the same namespace.
    return str(getattr(args, "log_level", "info") or "info")


async def _serve(kopf: Any, ctx: Any, registry: Any, args: argparse.Namespace, liveness: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # kopf finishes what it is doing, leaves the peering (so a successor does not wait for our
    # record to expire) and returns.
    await kopf.operator(
        registry=registry,
        clusterwide=bool(args.all_namespaces),
        namespaces=args.namespace or (),
        standalone=args.standalone,
        peering_name=args.peering,
        liveness_endpoint=liveness,
        stop_flag=stop,
    )
