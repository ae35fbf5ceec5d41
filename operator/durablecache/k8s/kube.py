"""A small synchronous wrapper around the Kubernetes client: exactly the calls the operator and the
worker make (and so exactly what the chart's ClusterRole grants). Async callers run these through
``asyncio.to_thread`` so the event loop keeps serving the proxy meanwhile."""

from __future__ import annotations

import base64
import datetime
import time
import uuid
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError

from .. import logs
from ..errors import ConnectError, UsageError
from . import API_VERSION, GROUP, KIND, PLURAL, VERSION

log = logs.get("durablecache.k8s")
MERGE = "application/merge-patch+json"
# Transient API failures (a restarting API server, a conflict) are retried this often, this long.
ATTEMPTS = 5
FIRST_BACKOFF = 0.2


def load_client() -> k8s.ApiClient:
    """KUBECONFIG (or ~/.kube/config) when present, else the pod's service account."""
    try:
        return k8s_config.new_client_from_config()
    except k8s_config.ConfigException:
        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException as exc:
            raise ConnectError(f"no Kubernetes credentials (no kubeconfig, not in a pod): {exc}") from None
        return k8s.ApiClient()


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def retrying(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Retry 409/429/5xx and connection errors a few times with backoff; anything else raises."""
    delay = FIRST_BACKOFF
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status not in (409, 429, 500, 502, 503, 504) or attempt == ATTEMPTS:
                raise
            log.debug("kubernetes call retried", call=what, status=exc.status, attempt=attempt)
        except (OSError, HTTPError) as exc:  # urllib3's MaxRetryError (refused, reset, TLS EOF) is no OSError
            if attempt == ATTEMPTS:
                raise ConnectError(f"Kubernetes API unreachable during {what}: {exc}") from None
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


class Kube:
    def __init__(self, api: k8s.ApiClient):
        self.api = api
        self.custom = k8s.CustomObjectsApi(api)
        self.core = k8s.CoreV1Api(api)
        self.apps = k8s.AppsV1Api(api)
        self.policy = k8s.PolicyV1Api(api)
        self.rbac = k8s.RbacAuthorizationV1Api(api)

    # -- the DurableCache -----------------------------------------------------------------------
    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return retrying("get", self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                            name)  # type: ignore[no-any-return]
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """A JSON merge patch of status (None deletes a key); a vanished resource is not an error."""
        try:
            retrying("patch status", self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace,
                     PLURAL, name, {"status": status}, _content_type=MERGE)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # -- Secrets --------------------------------------------------------------------------------
    def secret_value(self, namespace: str, name: str, key: str) -> str:
        try:
            secret = retrying("get secret", self.core.read_namespaced_secret, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise UsageError(f"Secret {namespace}/{name} not found") from None
            raise
        data = secret.data or {}
        if key not in data:
            raise UsageError(f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode()

    def apply_secret(self, namespace: str, name: str, data: dict[str, str], owner: dict[str, Any]) -> bool:
        """Create the Secret or merge ``data`` into it. Returns True when something changed.

        Only the keys we own change: an application's other keys in the same Secret stay as they are."""
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        try:
            current = retrying("get secret", self.core.read_namespaced_secret, name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": name, "namespace": namespace,
                                 "labels": {"app.kubernetes.io/managed-by": "durablecache"},
                                 "annotations": {f"{GROUP}/owner": owner_key(owner)}},
                    "type": "Opaque", "data": encoded}
            retrying("create secret", self.core.create_namespaced_secret, namespace, body)
            return True
        if all((current.data or {}).get(k) == v for k, v in encoded.items()):
            return False
        retrying("patch secret", self.core.patch_namespaced_secret, name, namespace, {"data": encoded})
        return True

    # -- Services -------------------------------------------------------------------------------
    def apply_external_name(self, namespace: str, name: str, host: str, port: int, owner: dict[str, Any]) -> bool:
        """The endpoint Service as an ExternalName alias of ``host``. Returns True when it changed."""
        body = {"metadata": {"name": name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/managed-by": "durablecache"},
                             "annotations": {f"{GROUP}/owner": owner_key(owner)}},
                "spec": {"type": "ExternalName", "externalName": host,
                         "ports": [{"name": "valkey", "port": port, "protocol": "TCP"}]}}
        try:
            current = retrying("get service", self.core.read_namespaced_service, name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            retrying("create service", self.core.create_namespaced_service, namespace, body)
            return True
        ports = [(p.port, p.protocol) for p in (current.spec.ports or [])]
        if current.spec.type == "ExternalName" and current.spec.external_name == host and ports == [(port, "TCP")]:
            return False
        retrying("patch service", self.core.patch_namespaced_service, name, namespace, {"spec": body["spec"]})
        return True

    def delete_quietly(self, kind: str, namespace: str, name: str) -> bool:
        """Delete a Deployment, Service, PodDisruptionBudget, ServiceAccount or RoleBinding; gone already
        is fine."""
        fn = {"Deployment": self.apps.delete_namespaced_deployment,
              "Service": self.core.delete_namespaced_service,
              "PodDisruptionBudget": self.policy.delete_namespaced_pod_disruption_budget,
              "ServiceAccount": self.core.delete_namespaced_service_account,
              "RoleBinding": self.rbac.delete_namespaced_role_binding}[kind]
        try:
            retrying(f"delete {kind}", fn, name, namespace)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def create_if_missing(self, kind: str, namespace: str, body: dict[str, Any]) -> bool:
        read, create = {
            "Deployment": (self.apps.read_namespaced_deployment, self.apps.create_namespaced_deployment),
            "Service": (self.core.read_namespaced_service, self.core.create_namespaced_service),
            "PodDisruptionBudget": (self.policy.read_namespaced_pod_disruption_budget,
                                    self.policy.create_namespaced_pod_disruption_budget),
            # The fleet's join token: created once, never read back or logged here.
            "Secret": (self.core.read_namespaced_secret, self.core.create_namespaced_secret),
        }[kind]
        try:
            retrying(f"get {kind}", read, body["metadata"]["name"], namespace)
            return False
        except ApiException as exc:
            if exc.status != 404:
                raise
        try:
            retrying(f"create {kind}", create, namespace, body)
        except ApiException as exc:
            if exc.status != 409:  # created meanwhile (by our previous incarnation): fine
                raise
            return False
        return True

    def update_deployment(self, namespace: str, body: dict[str, Any], hash_annotation: str) -> bool:
        """Bring an existing Deployment's replicas and pod template to ``body``'s when the hash it carries
        in ``hash_annotation`` differs (a spec change; the API server's own defaults do not count).
        Returns True when it was patched."""
        name = body["metadata"]["name"]
        current = retrying("get Deployment", self.apps.read_namespaced_deployment, name, namespace)
        wanted = body["metadata"]["annotations"][hash_annotation]
        if (current.metadata.annotations or {}).get(hash_annotation) == wanted:
            return False
        patch = {"metadata": {"annotations": {hash_annotation: wanted}},
                 "spec": {"replicas": body["spec"]["replicas"], "template": body["spec"]["template"]}}
        retrying("patch Deployment", self.apps.patch_namespaced_deployment, name, namespace, patch)
        return True

    # -- the worker's identity ------------------------------------------------------------------
    def apply_identity(self, kind: str, namespace: str, body: dict[str, Any]) -> str:
        """Create the worker's ServiceAccount or RoleBinding, or bring an existing one back to ``body``.

        Returns "created", "updated" or "unchanged". An existing object is patched when its owner
        references, subjects or labels differ (e.g. left by a deleted DurableCache of the same name and
        not yet garbage-collected: re-owned, the collector no longer takes it from the new worker). A
        RoleBinding's roleRef is immutable: a different one is deleted and created again."""
        read, create, patch = {
            "ServiceAccount": (self.core.read_namespaced_service_account, self.core.create_namespaced_service_account,
                               self.core.patch_namespaced_service_account),
            "RoleBinding": (self.rbac.read_namespaced_role_binding, self.rbac.create_namespaced_role_binding,
                            self.rbac.patch_namespaced_role_binding),
        }[kind]
        name = body["metadata"]["name"]
        try:
            current = self.api.sanitize_for_serialization(retrying(f"get {kind}", read, name, namespace))
        except ApiException as exc:
            if exc.status != 404:
                raise
            current = None
        if current is not None and kind == "RoleBinding" and current.get("roleRef") != body["roleRef"]:
            self.delete_quietly(kind, namespace, name)
            current = None
        if current is None:
            try:
                retrying(f"create {kind}", create, namespace, body)
            except ApiException as exc:
                if exc.status != 409:  # created meanwhile (by our previous incarnation): fine
                    raise
                return "unchanged"
            return "created"
        meta, want = current["metadata"], body["metadata"]
        drift: dict[str, Any] = {}
        if meta.get("ownerReferences") != want["ownerReferences"]:
            drift.setdefault("metadata", {})["ownerReferences"] = want["ownerReferences"]
        if not want["labels"].items() <= (meta.get("labels") or {}).items():
            drift.setdefault("metadata", {})["labels"] = want["labels"]
        if kind == "RoleBinding" and current.get("subjects") != body["subjects"]:
            drift["subjects"] = body["subjects"]
        if not drift:
            return "unchanged"
        # A merge patch replaces lists whole: the stale owner reference goes (two controllers are refused).
        retrying(f"patch {kind}", patch, name, namespace, drift, _content_type=MERGE)
        return "updated"

    # -- rollout restart of the applications ----------------------------------------------------
    def restart_workload(self, namespace: str, kind: str, name: str, reason: str) -> None:
        """What ``kubectl rollout restart`` does: a pod-template annotation change."""
        patch = {"spec": {"template": {"metadata": {"annotations": {
            f"{GROUP}/restartedAt": now_iso(), f"{GROUP}/restartReason": reason}}}}}
        fn = {"Deployment": self.apps.patch_namespaced_deployment,
              "StatefulSet": self.apps.patch_namespaced_stateful_set,
              "DaemonSet": self.apps.patch_namespaced_daemon_set}[kind]
        retrying(f"restart {kind}", fn, name, namespace, patch)

    # -- Events ---------------------------------------------------------------------------------
    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str, component: str) -> None:
        """A core/v1 Event on the DurableCache (what `kubectl describe dcache` lists). Best effort."""
        meta = obj["metadata"]
        stamp = now_iso()
        body = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "reason": reason, "message": message[:1024], "type": type_,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "source": {"component": component}, "reportingComponent": component,
        }
        try:
            retrying("create event", self.core.create_namespaced_event, meta["namespace"], body)
        except (ApiException, ConnectError) as exc:
            # An Event is a notification; failing to post one must never stop a migration.
            log.warning("event not posted", reason=reason, error=str(exc)[:200])


def owner_key(obj: dict[str, Any]) -> str:
    return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    """Owned objects go away with the DurableCache (the garbage collector deletes them)."""
    meta = obj["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}
