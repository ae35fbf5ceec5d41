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
