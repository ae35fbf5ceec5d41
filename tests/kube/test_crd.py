"""The DurableCache CRD on a real kube-apiserver: it installs, accepts what users write, and the API
server itself (OpenAPI schema and CEL rules) rejects what is wrong with a readable message."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from .conftest import REPO, KubeEnv

GROUP, VERSION, PLURAL = "durablecache.dev", "v1alpha1", "durablecaches"
EXAMPLES = sorted((REPO / "docs" / "examples").glob("*.yaml"))

# The manifest the team's design note gave as "what a user writes", verbatim: the UX the CRD must accept.
DESIGN_EXAMPLE = """
apiVersion: durablecache.dev/v1alpha1
kind: DurableCache
metadata: {name: sessions, namespace: shop}
spec:
  source:
    replicationGroupId: sessions-prod          # the existing non-durable cluster
    authSecretRef: {name: sessions-auth, key: token}
  target:
    provider: aws
    replicationGroupId: sessions-durable
    durability: sync                            # or async
    nodeType: cache.r7g.large
    shards: 2
    replicasPerShard: 1
  cutover:
    mode: manual                                # auto | manual
    approved: false                             # flip to true to cut over
    maxWritePause: 100ms
    rollbackWindow: 30m
  endpoint:
    secretName: sessions-cache                  # what the apps read (host, port, tls, url)
    restartWorkloads: [{kind: Deployment, name: cart-api}]
  deletionPolicy: {source: Retain, target: Retain}
"""

Body = dict[str, Any]


def minimal(name: str = "dc") -> Body:
    """The smallest valid DurableCache (static target, everything else defaulted)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "DurableCache", "metadata": {"name": name},
        "spec": {
            "source": {"endpoints": [{"host": "127.0.0.1", "port": 7000}]},
            "target": {"provider": "static", "durability": "async",
                       "endpoints": [{"host": "127.0.0.1", "port": 7001}]},
            "endpoint": {"secretName": "cache"},
        },
    }


@pytest.fixture
def custom(kube_api: client.ApiClient, crd_installed: str) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube_api)


def create(api: client.CustomObjectsApi, ns: str, body: Body, dry_run: bool = False) -> Body:
    kwargs = {"dry_run": "All"} if dry_run else {}
    return api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body, **kwargs)


def assert_contains(stored: Any, written: Any, path: str) -> None:
    """Everything written is stored as written; the server may only add defaults."""
    if isinstance(written, dict):
        assert isinstance(stored, dict), path
        for key, value in written.items():
            assert key in stored, f"{path}.{key} was pruned"
            assert_contains(stored[key], value, f"{path}.{key}")
    elif isinstance(written, list):
        assert isinstance(stored, list) and len(stored) == len(written), path
        for i, (s, w) in enumerate(zip(stored, written, strict=True)):
            assert_contains(s, w, f"{path}[{i}]")
    else:
        assert stored == written, path


def rejection(call: Callable[[], object]) -> str:
    """The API server's refusal message for a call that must be rejected as invalid (422)."""
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status == 422, f"expected 422 Invalid, got {info.value.status}: {info.value.body}"
    return str(yaml.safe_load(info.value.body)["message"])


def test_crd_is_established_with_names(kube_env: KubeEnv, crd_installed: str,
                                        kube_api: client.ApiClient) -> None:
    crd = client.ApiextensionsV1Api(kube_api).read_custom_resource_definition(crd_installed)
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions.get("Established") == "True"
    assert conditions.get("NamesAccepted") == "True"
    assert crd.spec.scope == "Namespaced"
    assert crd.spec.names.short_names == ["dcache"]
    version = crd.spec.versions[0]
    assert (version.name, version.served, version.storage) == ("v1alpha1", True, True)
    assert version.subresources.status == {}
    # The API server publishes the schema: `kubectl explain` reads it back.
    out = kube_env.kubectl("explain", "dcache.spec.target.durability").stdout
    assert "sync" in out and "async" in out
    # Every top-level field and every field of spec is described (`kubectl explain` shows it).
    for path in ("dcache", "dcache.spec", "dcache.status", "dcache.spec.source", "dcache.spec.endpoint"):
        out = kube_env.kubectl("explain", path).stdout
        description = out.split("DESCRIPTION:", 1)[1].split("FIELDS:", 1)[0].strip()
        assert description and "<empty>" not in description, (path, out)
    spec_fields = kube_env.kubectl("explain", "dcache.spec").stdout.split("FIELDS:", 1)[1]
    assert "<empty>" not in spec_fields, spec_fields


@pytest.mark.parametrize("source", ["design", *[p.name for p in EXAMPLES]])
def test_documented_manifests_are_accepted(custom: client.CustomObjectsApi, kube_env: KubeEnv,
                                           source: str) -> None:
    text = DESIGN_EXAMPLE if source == "design" else (REPO / "docs" / "examples" / source).read_text()
    body = yaml.safe_load(text)
    ns = body["metadata"]["namespace"]
    if kube_env.kubectl("get", "namespace", ns, check=False).returncode != 0:
        kube_env.kubectl("create", "namespace", ns)
    body["metadata"]["name"] = f"{body['metadata']['name']}-{source.split('.')[0]}"
    created = create(custom, ns, body)
    spec = created["spec"]
    # Every written field survives unchanged (nothing pruned by the schema) ...
    assert_contains(spec, body["spec"], "spec")
    # ... and the schema's defaults are filled in for what the user left out.
    assert spec["deletionPolicy"] == {"source": "Retain", "target": "Retain"}
    assert "maxWritePause" in spec["cutover"] and "rollbackWindow" in spec["cutover"]
    assert spec["seeding"]["mode"] in ("none", "snapshot")


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"sessions-aws.yaml", "sessions-static.yaml"} <= names


def test_defaults(custom: client.CustomObjectsApi, kube_namespace: str) -> None:
    spec = create(custom, kube_namespace, minimal())["spec"]
    assert spec["cutover"] == {"mode": "manual", "approved": False, "maxWritePause": "100ms", "maxKeyPause": "5s",
                               "rollbackWindow": "30m", "rollback": False}
    assert spec["seeding"] == {"mode": "none"}
    assert spec["deletionPolicy"] == {"source": "Retain", "target": "Retain"}
    assert spec["routeIn"] == {"settlePeriod": "30s"}
    assert spec["proxy"] == {"replicas": 2, "processes": 1}
    assert (spec["target"]["shards"], spec["target"]["replicasPerShard"]) == (1, 1)


def _with(path: str, value: Any, base: Body | None = None) -> Body:
    """A copy of ``base`` (default: minimal()) with spec.<path> set; value None deletes it."""
    body = copy.deepcopy(base or minimal())
    node = body["spec"]
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return body


AWS_TARGET = {"provider": "aws", "replicationGroupId": "new-rg", "durability": "sync"}

INVALID: list[tuple[str, Body, list[str]]] = [
    ("bad durability enum", _with("target.durability", "disabled"),
     ['spec.target.durability', 'Unsupported value: "disabled"', '"sync"', '"async"']),
    ("bad provider enum", _with("target.provider", "gcp"), ['spec.target.provider', 'Unsupported value']),
    ("bad cutover mode", _with("cutover.mode", "yolo"), ["spec.cutover.mode", "Unsupported value"]),
    ("bad deletion policy", _with("deletionPolicy.target", "SnapshotThenDelete"),
     ["spec.deletionPolicy.target", "Unsupported value"]),
    ("missing durability", _with("target.durability", None), ["spec.target.durability", "Required value"]),
    ("missing source", _with("source", None), ["spec.source", "Required value"]),
    ("missing endpoint", _with("endpoint", None), ["spec.endpoint", "Required value"]),
    ("neither source form", _with("source", {"tls": {"enabled": True}}),
     ["set exactly one of source.replicationGroupId or source.endpoints"]),
    ("both source forms", _with("source.replicationGroupId", "old-rg"),
     ["set exactly one of source.replicationGroupId or source.endpoints"]),
    ("aws without replication group", _with("target", {"provider": "aws", "durability": "sync"}),
     ["target.provider aws requires target.replicationGroupId"]),
    ("static without endpoints", _with("target", {"provider": "static", "durability": "sync"}),
     ["target.provider static requires target.endpoints"]),
    ("node type not durable-capable", _with("target", {**AWS_TARGET, "nodeType": "cache.t4g.micro"}),
     ["node type of family r7g, r6g, m7g, m6g or c7gn"]),
    ("no replicas", _with("target.replicasPerShard", 0), ["spec.target.replicasPerShard", "0"]),
    ("port out of range", _with("source.endpoints", [{"host": "h", "port": 70000}]),
     ["spec.source.endpoints[0].port", "65535"]),
    ("write pause not a duration", _with("cutover.maxWritePause", "fast"), ["spec.cutover.maxWritePause"]),
    ("write pause unbounded", _with("cutover.maxWritePause", "5m"), ["between 1ms and 30s"]),
    ("drain budget over write pause", _with("cutover.drainBudget", "1s"),
     ["cutover.drainBudget must not exceed cutover.maxWritePause"]),
    ("snapshot seeding on static", _with("seeding", {"mode": "snapshot"}),
     ["seeding.mode snapshot needs target.provider aws"]),
    ("source deletion on static", _with("deletionPolicy.source", "Delete"),
     ["deletionPolicy.source SnapshotThenDelete or Delete needs an ElastiCache source"]),
    ("endpoint with nothing to switch", _with("endpoint", {"restartWorkloads": []}),
     ["endpoint needs secretName and/or serviceName"]),
    ("restart of an unsupported kind", _with("endpoint.restartWorkloads", [{"kind": "Pod", "name": "x"}]),
     ["spec.endpoint.restartWorkloads[0].kind", "Unsupported value"]),
    ("iam and a secret on one side", _with("target.auth", {"iam": {"userId": "app", "cacheName": "c"}},
                                           _with("target.authSecretRef", {"name": "s"})),
     ["set at most one of target.authSecretRef or target.auth.iam"]),
    ("iam on static endpoints without a cache name", _with("source.auth", {"iam": {"userId": "app"}}),
     ["source.auth.iam needs cacheName unless source.replicationGroupId is set"]),
    ("iam user id not an ElastiCache id", _with("source.auth", {"iam": {"userId": "App_1", "cacheName": "c"}}),
     ["spec.source.auth.iam.userId"]),
    ("duplicate restart workload", _with("endpoint.restartWorkloads",
                                         [{"kind": "Deployment", "name": "a"}] * 2),
     ["spec.endpoint.restartWorkloads[1]", "Duplicate value"]),
    ("proxy processes as another word", _with("proxy.processes", "many"), ["proxy.processes must be 1 to 64 or auto"]),
    ("no proxy process", _with("proxy.processes", 0), ["proxy.processes must be 1 to 64 or auto"]),
    ("no proxy pod", _with("proxy.replicas", 0), ["spec.proxy.replicas"]),
    ("a client limit of 0", _with("proxy.maxClients", 0), ["spec.proxy.maxClients"]),
    ("a total client limit of 0", _with("proxy.maxClientsTotal", 0), ["spec.proxy.maxClientsTotal"]),
    ("a quantity that is none", _with("proxy.resources", {"limits": {"cpu": "lots"}}),
     ["spec.proxy.resources.limits.cpu"]),
    ("a TLS secret that is no name", _with("proxy.tls.secretName", "Not_A_Name"), ["spec.proxy.tls.secretName"]),
]


@pytest.mark.parametrize(("body", "expected"), [(b, e) for _, b, e in INVALID],
                         ids=[i for i, _, _ in INVALID])
def test_invalid_is_rejected_with_readable_message(custom: client.CustomObjectsApi, kube_namespace: str,
                                                   body: Body, expected: list[str]) -> None:
    message = rejection(lambda: create(custom, kube_namespace, body, dry_run=True))
    for part in expected:
        assert part in message, f"{part!r} not in API server message: {message}"


def test_the_same_manifests_are_accepted_when_fixed(custom: client.CustomObjectsApi,
                                                    kube_namespace: str) -> None:
    """Guards the table above: each rejection is due to the one field it changes."""
    create(custom, kube_namespace, _with("target", AWS_TARGET), dry_run=True)
    create(custom, kube_namespace, _with("target", {**AWS_TARGET, "nodeType": "cache.c7gn.xlarge"}),
           dry_run=True)
    create(custom, kube_namespace, _with("cutover.drainBudget", "80ms"), dry_run=True)
    aws_source = _with("source", {"replicationGroupId": "old-rg"}, _with("target", AWS_TARGET))
    create(custom, kube_namespace, _with("seeding", {"mode": "snapshot"}, aws_source), dry_run=True)
    create(custom, kube_namespace, _with("deletionPolicy.source", "SnapshotThenDelete", aws_source), dry_run=True)
    create(custom, kube_namespace, _with("source.auth", {"iam": {"userId": "app", "cacheName": "c"}}), dry_run=True)
    create(custom, kube_namespace, _with("target.auth", {"iam": {"userId": "app"}}, aws_source), dry_run=True)
    create(custom, kube_namespace, _with("proxy", {
        "processes": "auto", "maxClients": 1, "announceHost": "cache.shop.svc", "tls": {"secretName": "p-tls"},
        "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}, "requests": {"cpu": 1}}}), dry_run=True)
    create(custom, kube_namespace, _with("proxy.processes", 64), dry_run=True)


def _patch(custom: client.CustomObjectsApi, ns: str, name: str, spec: Body) -> Body:
    return custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": spec})


@pytest.mark.parametrize(("change", "expected"), [
    ({"source": {"endpoints": [{"host": "127.0.0.1", "port": 7999}]}}, "source is immutable"),
    ({"target": {"provider": "aws", "replicationGroupId": "x"}}, "target.provider is immutable"),
    ({"target": {"replicationGroupId": "other"}}, "target.replicationGroupId is immutable"),
    ({"target": {"durability": "disabled"}}, 'Unsupported value: "disabled"'),
])
def test_immutable_and_illegal_changes_are_rejected(custom: client.CustomObjectsApi, kube_namespace: str,
                                                    change: Body, expected: str) -> None:
    base = minimal()
    if "replicationGroupId" in change.get("target", {}) and "provider" not in change["target"]:
        base = _with("target", {**AWS_TARGET, "replicationGroupId": "first"})
    create(custom, kube_namespace, base)
    message = rejection(lambda: _patch(custom, kube_namespace, "dc", change))
    assert expected in message, message


def test_durability_may_switch_between_sync_and_async(custom: client.CustomObjectsApi,
                                                      kube_namespace: str) -> None:
    create(custom, kube_namespace, minimal())
    assert _patch(custom, kube_namespace, "dc", {"target": {"durability": "sync"}})["spec"]["target"][
        "durability"] == "sync"
    assert _patch(custom, kube_namespace, "dc", {"target": {"durability": "async"}})["spec"]["target"][
        "durability"] == "async"
    # Mutable knobs users turn during a migration are not caught by the immutability rules.
    spec = _patch(custom, kube_namespace, "dc", {"cutover": {"approved": True, "rollback": True}})["spec"]
    assert spec["cutover"]["approved"] is True and spec["cutover"]["rollback"] is True


STATUS = {
    "phase": "Sync",
    "observedGeneration": 1,
    "progress": {"percent": 100, "display": "100%", "keysCopied": 1200, "keysTotal": 1200,
                 "bytesCopied": 65536},
    "dirtyBacklog": 3,
    "targetDurability": "sync",
    "sourceName": "sessions-prod",
    "targetName": "sessions-durable",
    "lastCutoverPauseMs": 12.5,
    "proxies": {"ready": 2, "total": 3, "processes": 4, "display": "2/3"},
    "endpoints": {"source": "127.0.0.1:7000", "target": "127.0.0.1:7001", "active": "proxy"},
    "conditions": [{"type": "Progressing", "status": "True", "reason": "Syncing",
                    "message": "dirty backlog 3 keys", "observedGeneration": 1,
                    "lastTransitionTime": "2025-01-01T00:00:00Z"}],
    "checkpoint": {"copy": {"127.0.0.1:7000": {"cursor": "1234", "done": False}}},
}


def test_status_subresource(custom: client.CustomObjectsApi, kube_namespace: str) -> None:
    created = create(custom, kube_namespace, minimal())
    generation = created["metadata"]["generation"]
    # Status written through the main resource is ignored (only the operator writes status) ...
    custom.patch_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "dc",
                                          {"status": {"phase": "Complete"}})
    got = custom.get_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "dc")
    assert "status" not in got or got["status"].get("phase") != "Complete"
    # ... and through /status it is stored, including the opaque checkpoint, without bumping generation.
    after = custom.patch_namespaced_custom_object_status(GROUP, VERSION, kube_namespace, PLURAL, "dc",
                                                         {"status": STATUS})
    assert after["status"] == STATUS
    assert after["metadata"]["generation"] == generation
    # A spec change does bump it: the operator compares it with status.observedGeneration.
    bumped = _patch(custom, kube_namespace, "dc", {"cutover": {"approved": True}})
    assert bumped["metadata"]["generation"] == generation + 1
    # The status schema is enforced too.
    message = rejection(lambda: custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, kube_namespace, PLURAL, "dc", {"status": {"progress": {"percent": 101}}}))
    assert "status.progress.percent" in message


def test_kubectl_get_prints_the_columns(custom: client.CustomObjectsApi, kube_env: KubeEnv,
                                        kube_namespace: str) -> None:
    body = yaml.safe_load(DESIGN_EXAMPLE)
    body["metadata"]["namespace"] = kube_namespace
    create(custom, kube_namespace, body)
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, kube_namespace, PLURAL, "sessions",
                                                 {"status": STATUS})
    out = kube_env.kubectl("-n", kube_namespace, "get", "dcache").stdout.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "PROGRESS", "DURABILITY", "SOURCE", "TARGET", "PROXIES", "AGE"]
    assert out[1].split()[:7] == ["sessions", "Sync", "100%", "sync", "sessions-prod", "sessions-durable", "2/3"]
    # The long and singular names work too; `all` does not include it (kubectl delete all --all must
    # not cancel a migration).
    long_name = kube_env.kubectl("-n", kube_namespace, "get", "durablecaches.durablecache.dev").stdout
    assert "sessions" in long_name
    assert "durablecache.dev/sessions" in kube_env.kubectl("-n", kube_namespace, "get", "durablecache",
                                                           "-o", "name").stdout
    assert "sessions" not in kube_env.kubectl("-n", kube_namespace, "get", "all").stdout


def test_crd_file_is_one_document() -> None:
    docs = [d for d in yaml.safe_load_all(Path(REPO / "crds" / "durablecache.yaml").read_text()) if d]
    assert len(docs) == 1 and docs[0]["kind"] == "CustomResourceDefinition"
