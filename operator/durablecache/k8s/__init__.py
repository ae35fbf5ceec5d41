"""The Kubernetes glue: kopf handlers, status, workloads and endpoint switching.

This is the only package that imports kopf or the Kubernetes client; the engine (migration, syncer,
copier, proxy) knows nothing about Kubernetes and runs the same under the CLI.
"""

GROUP = "durablecache.dev"
VERSION = "v1alpha1"
PLURAL = "durablecaches"
KIND = "DurableCache"
API_VERSION = f"{GROUP}/{VERSION}"
FINALIZER = f"{GROUP}/cleanup"
COMPONENT = "durablecache-operator"

# The operator's own settings (commands/operator.py's flags default to these; k8s/handlers.py uses them).
RECONCILE_INTERVAL = 1.0     # seconds between passes of one DurableCache's reconcile loop
READY_TIMEOUT = 3600.0       # seconds Provision waits, from when it began, for a new target to be ready
