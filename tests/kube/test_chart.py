"""The Helm chart, rendered by a real helm and checked by a real kube-apiserver: lint, render, server-side
dry-run of every object, values schema, restricted Pod Security, install/upgrade/uninstall, and the
chart's RBAC is exactly enough for the operator."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from .conftest import CHART_DIR, CRD_FILE, KubeEnv, OperatorRelease, adopt_for_helm, tools_dir

CHART_CRD_COPY = CHART_DIR / "files" / "durablecache.yaml"
APP_VERSION = str(yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"])
# Everything optional switched on (the ServiceMonitor needs the Prometheus Operator's CRD, so the
# server-side dry-run below renders it only in the render test).
ALL_ON = ["--set", "metrics.service.enabled=true", "--set", "networkPolicy.enabled=true",
          "--set", "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/dc"]

Doc = dict[str, Any]


# What a real install sees when it renders: helm applies crds/ (kopf's peering CRDs) first.
PEERING_SERVED = ("--api-versions", "kopf.dev/v1/ClusterKopfPeering")


def render(env: KubeEnv, *args: str, namespace: str = "durablecache-system", peering_served: bool = True) -> list[Doc]:
    served = PEERING_SERVED if peering_served else ()
    out = env.helm("template", "durablecache-operator", str(CHART_DIR), "--namespace", namespace, *served,
                   *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[Doc]) -> dict[str, Doc]:
    """kind -> the one object of that kind; the workers' ClusterRole is "WorkerClusterRole"."""
    kinds: dict[str, Doc] = {}
    for d in docs:
        kind = d["kind"]
        if kind == "ClusterRole" and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "worker":
            kind = "WorkerClusterRole"
        assert kind not in kinds, f"two {kind} objects rendered"
        kinds[kind] = d
    return kinds


def arg_value(args: list[str], flag: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]
    return value


# Exactly the calls `durablecache worker` makes (k8s/kube.py: get, patch_status, secret_value, event;
# k8s/lease.py: read, create and replace its coordinator Lease).
WORKER_RULES = [
    {"apiGroups": ["durablecache.dev"], "resources": ["durablecaches"], "verbs": ["get"]},
    {"apiGroups": ["durablecache.dev"], "resources": ["durablecaches/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
]


def test_chart_crd_is_the_repository_crd(kube_env: KubeEnv) -> None:
    # One source of truth: the chart carries a byte-identical copy (Helm cannot read files outside
    # the chart, and a symlink would break `helm package`).
    assert CHART_CRD_COPY.read_bytes() == CRD_FILE.read_bytes(), (
        f"{CHART_CRD_COPY} differs from {CRD_FILE}; run: cp {CRD_FILE} {CHART_CRD_COPY}")
    rendered = by_kind(render(kube_env))["CustomResourceDefinition"]
    source = yaml.safe_load(CRD_FILE.read_text())
    assert rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    rendered = copy.deepcopy(rendered)
    for extra in ("annotations", "labels"):
        rendered["metadata"].pop(extra)
    assert rendered == source


def test_helm_lint(kube_env: KubeEnv) -> None:
    out = kube_env.helm("lint", "--strict", str(CHART_DIR)).stdout
    assert "0 chart(s) failed" in out
    kube_env.helm("lint", "--strict", str(CHART_DIR), *ALL_ON, "--set", "metrics.serviceMonitor.enabled=true",
                  "--set", "prometheusRule.enabled=true", "--set", "crds.enabled=false",
                  "--set", "peering.enabled=false")


def test_rendered_defaults(kube_env: KubeEnv) -> None:
    docs = by_kind(render(kube_env))
    assert set(docs) == {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                         "WorkerClusterRole", "Deployment", "ClusterKopfPeering"}
    deploy = docs["Deployment"]
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"ghcr.io/durablecache/durablecache:{APP_VERSION}"
    assert container["command"] == ["durablecache"]
    args = container["args"]
    worker_role = docs["WorkerClusterRole"]
    assert args[args.index("operator") + 1:] == [
        "--health-port=8080", "--metrics-port=9090",
        f"--peering={docs['ClusterKopfPeering']['metadata']['name']}", "--all-namespaces",
        # The workers run the chart's image, each as its own ServiceAccount bound to the worker role.
        f"--worker-image={container['image']}", f"--worker-cluster-role={worker_role['metadata']['name']}"]
    assert worker_role["metadata"]["name"] == f"{docs['ClusterRole']['metadata']['name']}-worker"
    assert worker_role["rules"] == WORKER_RULES
    # The operator may bind that role and no other.
    (bind,) = [r for r in docs["ClusterRole"]["rules"] if "bind" in r["verbs"]]
    assert bind == {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"],
                    "resourceNames": [worker_role["metadata"]["name"]]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    binding = docs["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": "durablecache-system"}]


def test_worker_role_holds_the_coordinator_lease_with_least_privilege(kube_env: KubeEnv) -> None:
    """Leases: get, create, update (renewals and takeovers are replaces with a resourceVersion
    precondition) and nothing else; no other role of the chart touches Leases (the operator does not)."""
    docs = by_kind(render(kube_env))
    lease_rules = [r for r in docs["WorkerClusterRole"]["rules"] if "coordination.k8s.io" in r["apiGroups"]]
    assert lease_rules == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                            "verbs": ["get", "create", "update"]}]
    assert not [r for r in docs["ClusterRole"]["rules"]
                if "coordination.k8s.io" in r["apiGroups"] or "*" in r["apiGroups"] or "*" in r["verbs"]]
    # The worker role is bound per namespace (RoleBinding, k8s/runner.py), never cluster-wide.
    assert docs["ClusterRoleBinding"]["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"]


def test_rendered_options(kube_env: KubeEnv) -> None:
    docs = by_kind(render(kube_env, *ALL_ON, "--set", "metrics.serviceMonitor.enabled=true",
                          "--set", "image.tag=1.2.3", "--set", "crds.enabled=false",
                          "--set", "operator.watchNamespaces={shop,cart}",
                          "--set", "prometheusRule.enabled=true", "--set", "prometheusRule.labels.release=kps"))
    # The suggested alerts (files/alerts.yaml, also in docs/metrics.md) as they are, {{ $labels }} intact.
    rule = docs["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load((CHART_DIR / "files" / "alerts.yaml").read_text())
    assert "{{ $labels.namespace }}" in rule["spec"]["groups"][0]["rules"][0]["annotations"]["summary"]
    assert "CustomResourceDefinition" not in docs
    assert docs["ServiceAccount"]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/dc"}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(":1.2.3")
    assert arg_value(container["args"], "--worker-image") == container["image"]
    assert "--namespace=shop" in container["args"] and "--namespace=cart" in container["args"]
    assert "--all-namespaces" not in container["args"]
    svc, monitor = docs["Service"], docs["ServiceMonitor"]
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    # The ServiceMonitor selects the metrics Service.
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"][0]["ports"] == [{"port": 9090, "protocol": "TCP"}]
    # Without peering the operator is told to run standalone, and no peering object is made.
    standalone = by_kind(render(kube_env, "--set", "peering.enabled=false"))
    assert "ClusterKopfPeering" not in standalone
    # Where the API server does not serve the kind (yet), the peering object is left out, nothing else.
    unserved = by_kind(render(kube_env, peering_served=False))
    assert set(by_kind(render(kube_env))) - set(unserved) == {"ClusterKopfPeering"}
    assert "--standalone" in standalone["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    # One ServiceAccount named for every worker replaces the per-worker identity (the flags exclude
    # each other in the operator).
    named = by_kind(render(kube_env, "--set", "worker.serviceAccountName=dc-worker"))
    args = named["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert arg_value(args, "--worker-service-account") == "dc-worker"
    assert not [a for a in args if a.startswith("--worker-cluster-role")]
    # The workers' pull secrets (names in the DurableCaches' namespaces) reach the operator as flags.
    pulling = by_kind(render(kube_env, "--set", "worker.imagePullSecrets[0].name=regcred",
                             "--set", "worker.imagePullSecrets[1].name=mirror"))
    args = pulling["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--worker-image-pull-secret")] == [
        "--worker-image-pull-secret=regcred", "--worker-image-pull-secret=mirror"]
    # rbac.create=false: neither ClusterRole is rendered (the user makes both).
    no_rbac = by_kind(render(kube_env, "--set", "rbac.create=false"))
    assert not {"ClusterRole", "WorkerClusterRole", "ClusterRoleBinding"} & set(no_rbac)


@pytest.mark.parametrize(("setting", "expected"), [
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("operator.logLevel=verbose", "logLevel"),
    ("metrics.port=70000", "port"),
    ("replicaCount=2", "replicaCount"),
    ("operator.watchNamespaces[0]=Not_A_Namespace", "watchNamespaces"),
    ("worker.serviceAccountName=Not_A_Name", "serviceAccountName"),
    ("worker.imagePullSecrets[0].name=Not_A_Name", "imagePullSecrets"),
    ("prometheusRule.enabled=maybe", "prometheusRule"),
    ("prometheusRule.severity=high", "prometheusRule"),
])
def test_values_schema_rejects_bad_values(kube_env: KubeEnv, setting: str, expected: str) -> None:
    result = kube_env.helm("template", "x", str(CHART_DIR), "--set", setting, check=False)
    assert result.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert expected in result.stderr


def _apply_chart_crds(kube_env: KubeEnv) -> None:
    """The chart's crds/ (kopf peering), as `helm install` would apply them before the templates."""
    for path in sorted((CHART_DIR / "crds").glob("*.yaml")):
        kube_env.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    kube_env.wait_established("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")


def test_every_rendered_object_is_valid_on_the_api_server(kube_env: KubeEnv, kube_namespace: str) -> None:
    _apply_chart_crds(kube_env)
    docs = render(kube_env, *ALL_ON, namespace=kube_namespace)
    result = kube_env.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(docs))
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == len(docs), result.stdout
    assert all(line.endswith("(server dry run)") for line in lines), result.stdout


def test_operator_pod_passes_restricted_pod_security(kube_env: KubeEnv, kube_namespace: str) -> None:
    """The API server's PodSecurity admission, enforcing `restricted`, admits the operator's pod."""
    kube_env.kubectl("label", "namespace", kube_namespace, "pod-security.kubernetes.io/enforce=restricted")
    template = by_kind(render(kube_env, namespace=kube_namespace))["Deployment"]["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "operator", "namespace": kube_namespace, **template["metadata"]},
           "spec": template["spec"]}
    # The pod references the chart's ServiceAccount; dry-run needs it to exist for no reason but realism.
    kube_env.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(pod))
    # Control: the same pod without its securityContext is refused, so the check above is real.
    weak = copy.deepcopy(pod)
    weak["spec"]["containers"][0].pop("securityContext")
    refused = kube_env.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(weak), check=False)
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr


def test_install_upgrade_uninstall_keeps_the_crd(kube_env: KubeEnv, crd_installed: str,
                                                 kube_api: client.ApiClient) -> None:
    release, namespace = "crd-owner", "crd-owner-system"
    # Users who applied crds/durablecache.yaml by hand hand it to the release this way.
    adopt_for_helm(kube_env, "crd", crd_installed, release, namespace)
    kube_env.helm("install", release, str(CHART_DIR), "--namespace", namespace, "--create-namespace",
                  "--set", "peering.enabled=false", timeout=120)
    ext = client.ApiextensionsV1Api(kube_api)
    crd = ext.read_custom_resource_definition(crd_installed)
    assert crd.metadata.annotations["meta.helm.sh/release-name"] == release
    # An upgrade re-applies the CRD template (that is why it is not in crds/).
    kube_env.helm("upgrade", release, str(CHART_DIR), "--namespace", namespace, "--set", "peering.enabled=false",
                  "--set", "metrics.service.enabled=true", timeout=120)
    rbac = client.RbacAuthorizationV1Api(kube_api)
    role_name = f"{release}-durablecache-operator"
    assert rbac.read_cluster_role(role_name).rules
    assert rbac.read_cluster_role(f"{role_name}-worker").rules
    kube_env.helm("uninstall", release, "--namespace", namespace, timeout=120)
    # resource-policy keep: the CRD (and so every DurableCache) survives; the rest is gone.
    assert ext.read_custom_resource_definition(crd_installed).status.conditions
    for name in (role_name, f"{role_name}-worker"):
        with pytest.raises(ApiException) as gone:
            rbac.read_cluster_role(name)
        assert gone.value.status == 404


@pytest.fixture(scope="module")
def empty_kube_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeEnv]:
    """A second etcd + kube-apiserver that no other test touches: a fresh cluster, without kopf's CRDs."""
    env = KubeEnv(workdir=tmp_path_factory.mktemp("empty-kube"), tools=tools_dir())
    try:
        env.start()
        yield env
    finally:
        env.stop()


def _manifest_kinds(helm_output: str) -> list[str]:
    """Kinds of the objects in `helm install --dry-run` output (the part before NOTES)."""
    manifest = helm_output.split("\nMANIFEST:", 1)[-1].split("\nNOTES:", 1)[0]
    return [d["kind"] for d in yaml.safe_load_all(manifest) if isinstance(d, dict) and "kind" in d]


def test_dry_run_and_install_on_an_empty_cluster(empty_kube_env: KubeEnv) -> None:
    """`helm install --dry-run` (client and server) applies nothing from crds/, so it must not render a
    kind only those CRDs define; the real install applies them first and does create the peering object."""
    env, release, namespace = empty_kube_env, "dc", "dc-system"
    crds = env.kubectl("get", "crd", "-o", "name").stdout
    assert "kopf.dev" not in crds and "durablecache.dev" not in crds, crds
    for mode in ("--dry-run", "--dry-run=server"):
        out = env.helm("install", release, str(CHART_DIR), "--namespace", namespace, "--create-namespace",
                       mode, timeout=120).stdout
        kinds = _manifest_kinds(out)
        assert "Deployment" in kinds and "CustomResourceDefinition" in kinds, (mode, kinds)
        assert "ClusterKopfPeering" not in kinds, (mode, kinds)
        assert "ClusterKopfPeering dc-durablecache-operator was left out" in out, out
    # Nothing was created by the dry runs.
    assert "kopf.dev" not in env.kubectl("get", "crd", "-o", "name").stdout
    out = env.helm("install", release, str(CHART_DIR), "--namespace", namespace, "--create-namespace",
                   timeout=180).stdout
    assert "was left out" not in out and "kubectl get clusterkopfpeering dc-durablecache-operator" in out, out
    peering = env.kubectl("get", "clusterkopfpeering", "dc-durablecache-operator", "-o",
                          "jsonpath={.metadata.annotations.meta\\.helm\\.sh/release-name}").stdout
    assert peering == release  # created by the release, so `helm uninstall` removes it
    # The NOTES do not claim the operator runs; they say how to check.
    assert "is running" not in out and "rollout status deploy/dc-durablecache-operator" in out, out
    # With the CRDs in place a dry run renders the peering object again.
    upgrade = env.helm("upgrade", release, str(CHART_DIR), "--namespace", namespace, "--dry-run=server",
                       timeout=120).stdout
    assert "ClusterKopfPeering" in _manifest_kinds(upgrade)
    env.helm("uninstall", release, "--namespace", namespace, timeout=120)
    gone = env.kubectl("get", "clusterkopfpeering", "dc-durablecache-operator", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr, gone.stderr


# (verb, resource, namespace-or-None) the operator needs; `kubectl auth can-i` must say yes.
ALLOWED = [
    ("get", "durablecaches.durablecache.dev", "ns"), ("list", "durablecaches.durablecache.dev", None),
    ("watch", "durablecaches.durablecache.dev", None), ("patch", "durablecaches.durablecache.dev", "ns"),
    ("update", "durablecaches.durablecache.dev", "ns"),
    ("patch", "durablecaches.durablecache.dev/status", "ns"),
    ("update", "durablecaches.durablecache.dev/finalizers", "ns"),
    ("create", "events", "ns"), ("patch", "events", "ns"), ("create", "events.events.k8s.io", "ns"),
    ("get", "secrets", "ns"), ("create", "secrets", "ns"), ("patch", "secrets", "ns"), ("update", "secrets", "ns"),
    ("create", "deployments.apps", "ns"), ("delete", "deployments.apps", "ns"), ("watch", "deployments.apps", None),
    ("create", "services", "ns"), ("delete", "services", "ns"),
    ("create", "poddisruptionbudgets.policy", "ns"), ("delete", "poddisruptionbudgets.policy", "ns"),
    ("patch", "statefulsets.apps", "ns"), ("patch", "daemonsets.apps", "ns"),
    ("list", "namespaces", None), ("watch", "namespaces", None),
    # Each worker's own identity (k8s/runner.py).
    ("get", "serviceaccounts", "ns"), ("create", "serviceaccounts", "ns"), ("patch", "serviceaccounts", "ns"),
    ("delete", "serviceaccounts", "ns"),
    ("get", "rolebindings.rbac.authorization.k8s.io", "ns"), ("create", "rolebindings.rbac.authorization.k8s.io", "ns"),
    ("patch", "rolebindings.rbac.authorization.k8s.io", "ns"),
    ("delete", "rolebindings.rbac.authorization.k8s.io", "ns"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("watch", "clusterkopfpeerings.kopf.dev", None), ("patch", "clusterkopfpeerings.kopf.dev", None),
]
# ... and what it must not be able to do.
DENIED = [
    ("delete", "namespaces", None), ("create", "namespaces", None),
    ("list", "secrets", None), ("delete", "secrets", "ns"), ("watch", "secrets", "ns"),
    ("create", "durablecaches.durablecache.dev", "ns"), ("delete", "durablecaches.durablecache.dev", "ns"),
    ("create", "pods", "ns"), ("create", "pods/exec", "ns"), ("get", "nodes", None),
    ("create", "clusterroles.rbac.authorization.k8s.io", None),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
    ("update", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("delete", "statefulsets.apps", "ns"), ("create", "serviceaccounts/token", "ns"),
    ("list", "serviceaccounts", "ns"), ("update", "serviceaccounts", "ns"),
    ("list", "rolebindings.rbac.authorization.k8s.io", "ns"), ("create", "roles.rbac.authorization.k8s.io", "ns"),
    # `bind` without a name means any ClusterRole: only the worker's is allowed (checked by name below).
    ("bind", "clusterroles.rbac.authorization.k8s.io", None),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", None),
]


def _can_i(kube_env: KubeEnv, kubeconfig: Path, verb: str, resource: str, ns: str | None,
           real_ns: str) -> bool:
    res, _, sub = resource.partition("/")
    args = ["auth", "can-i", verb, res]
    if sub:
        args.append(f"--subresource={sub}")
    args += ["-n", real_ns] if ns else ["--all-namespaces"]
    out = kube_env.kubectl(*args, kubeconfig=kubeconfig, check=False)
    assert out.stdout.strip() in ("yes", "no"), out.stdout + out.stderr
    return out.stdout.strip() == "yes"


def test_chart_rbac_grants_what_the_operator_needs_and_no_more(
        kube_env: KubeEnv, operator_release: OperatorRelease, kube_namespace: str) -> None:
    kc = operator_release.kubeconfig
    who = kube_env.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=kc).stdout
    assert who == f"system:serviceaccount:{operator_release.namespace}:{operator_release.service_account}"
    missing = [a for a in ALLOWED if not _can_i(kube_env, kc, *a, real_ns=kube_namespace)]
    assert not missing, f"the chart's ClusterRole lacks: {missing}"
    extra = [d for d in DENIED if _can_i(kube_env, kc, *d, real_ns=kube_namespace)]
    assert not extra, f"the chart's ClusterRole allows too much: {extra}"
    worker_role = f"{operator_release.cluster_role}-worker"
    for role, allowed in ((worker_role, True), ("cluster-admin", False), (operator_release.cluster_role, False)):
        out = kube_env.kubectl("auth", "can-i", "bind", f"clusterroles.rbac.authorization.k8s.io/{role}",
                               kubeconfig=kc, check=False)
        assert out.stdout.strip() == ("yes" if allowed else "no"), (role, out.stdout, out.stderr)


def test_service_account_has_no_rights_until_bound(kube_env: KubeEnv, operator_release: OperatorRelease,
                                                  sa_kubeconfig: Callable[..., Path]) -> None:
    """A fresh token identity is not privileged by the harness; the chart's ClusterRole is what grants."""
    ns = f"sa-{uuid.uuid4().hex[:6]}"
    bare = sa_kubeconfig(ns, "bare")
    assert not _can_i(kube_env, bare, "list", "durablecaches.durablecache.dev", None, real_ns=ns)
    bound = sa_kubeconfig(ns, "bound", bind_cluster_role=operator_release.cluster_role)
    assert _can_i(kube_env, bound, "list", "durablecaches.durablecache.dev", None, real_ns=ns)


def test_operator_identity_makes_real_calls(kube_env: KubeEnv, operator_release: OperatorRelease,
                                            kube_namespace: str, crd_installed: str) -> None:
    """What the operator does, done for real with the chart's service-account token."""
    kube_env.kubectl("-n", kube_namespace, "apply", "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": "durablecache.dev/v1alpha1", "kind": "DurableCache", "metadata": {"name": "dc"},
        "spec": {"source": {"endpoints": [{"host": "127.0.0.1", "port": 7000}]},
                 "target": {"provider": "static", "durability": "sync",
                            "endpoints": [{"host": "127.0.0.1", "port": 7001}]},
                 "endpoint": {"secretName": "cache"}}}))
    kc = operator_release.kubeconfig
    as_operator = client.ApiClient(_config(kc))
    try:
        custom = client.CustomObjectsApi(as_operator)
        listed = custom.list_cluster_custom_object("durablecache.dev", "v1alpha1", "durablecaches")
        assert any(i["metadata"]["name"] == "dc" for i in listed["items"])
        custom.patch_namespaced_custom_object_status(
            "durablecache.dev", "v1alpha1", kube_namespace, "durablecaches", "dc",
            {"status": {"phase": "Preflight", "observedGeneration": 1}})
        core = client.CoreV1Api(as_operator)
        core.create_namespaced_secret(kube_namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name="cache"), string_data={"host": "127.0.0.1", "port": "7000"}))
        core.patch_namespaced_secret("cache", kube_namespace, {"stringData": {"port": "7001"}})
        core.create_namespaced_event(kube_namespace, client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="dc."),
            involved_object=client.V1ObjectReference(api_version="durablecache.dev/v1alpha1",
                                                     kind="DurableCache", name="dc", namespace=kube_namespace),
            reason="PhaseChanged", message="Preflight", type="Normal"))
        custom.patch_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", operator_release.peering,
            {"status": {"test-peer": {"priority": 0, "lifetime": 60, "lastseen": "2025-01-01T00:00:00"}}})
        with pytest.raises(ApiException) as denied:
            core.delete_namespace(kube_namespace)
        assert denied.value.status == 403
        with pytest.raises(ApiException) as denied:
            core.list_namespaced_secret(kube_namespace)
        assert denied.value.status == 403
        # A worker's identity: the RoleBinding of the worker ClusterRole is accepted (bind on it) ...
        rbac = client.RbacAuthorizationV1Api(as_operator)
        core.create_namespaced_service_account(kube_namespace, {"metadata": {"name": "dc-durablecache-worker"}})
        subject = [{"kind": "ServiceAccount", "name": "dc-durablecache-worker", "namespace": kube_namespace}]

        def binding(name: str, role: str) -> dict[str, Any]:
            return {"metadata": {"name": name}, "subjects": subject,
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}}

        worker_role = f"{operator_release.cluster_role}-worker"
        rbac.create_namespaced_role_binding(kube_namespace, binding("dc-durablecache-worker", worker_role))
        # ... and RBAC's escalation check refuses binding anything the operator neither may bind nor holds.
        with pytest.raises(ApiException) as denied:
            rbac.create_namespaced_role_binding(kube_namespace, binding("escalate", "cluster-admin"))
        assert denied.value.status == 403
        rbac.delete_namespaced_role_binding("dc-durablecache-worker", kube_namespace)
        core.delete_namespaced_service_account("dc-durablecache-worker", kube_namespace)
    finally:
        as_operator.close()
    assert kube_env.kubectl("-n", kube_namespace, "get", "dcache", "dc",
                            "-o", "jsonpath={.status.phase}").stdout == "Preflight"


def _config(kubeconfig: Path) -> client.Configuration:
    from kubernetes import config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return cfg


# --- The image the chart runs (no Docker engine here: check what ties the Dockerfile to the chart) ---

REPO_ROOT = CHART_DIR.parents[1]


def _runtime_closure(dist: str) -> dict[str, str]:
    """name -> installed version for ``dist`` and everything it needs at runtime (no extras)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, str] = {}
    todo = [dist]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen[name] = metadata.version(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_constraints_pin_every_runtime_dependency_as_tested() -> None:
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    closure = _runtime_closure("durablecache")
    closure.pop("durablecache")
    unpinned = sorted(set(closure) - set(pins))
    assert not unpinned, f"runtime dependencies missing from constraints.txt: {unpinned}"
    drift = {n: (pins[n], v) for n, v in closure.items() if pins[n] != v}
    assert not drift, f"constraints.txt differs from the tested venv (pinned, installed): {drift}"


def test_dockerfile_matches_what_the_chart_runs(kube_env: KubeEnv) -> None:
    lines = [line.strip() for line in (REPO_ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    froms = [line for line in instructions if line.startswith("FROM ")]
    assert len(froms) == 2, "multi-stage: a build stage and a runtime stage"
    assert 'ARG PYTHON_IMAGE=python:3.11-slim' in instructions
    assert "--constraint constraints.txt" in "\n".join(instructions)
    pod = by_kind(render(kube_env))["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The chart's runAsUser/runAsNonRoot rely on the image's numeric non-root USER.
    user = pod["securityContext"]["runAsUser"]
    assert f"USER {user}:{user}" in instructions
    assert instructions[-2:] == [f'ENTRYPOINT {container["command"]}'.replace("'", '"'), 'CMD ["operator"]']
    exposed = {int(p) for line in instructions if line.startswith("EXPOSE ") for p in line.split()[1:]}
    assert {p["containerPort"] for p in container["ports"]} <= exposed
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    # Allow-list: `COPY . .` sends only the package, its metadata and the pins into the build.
    assert "*" in ignore and {"!pyproject.toml", "!constraints.txt", "!operator/"} <= set(ignore)
