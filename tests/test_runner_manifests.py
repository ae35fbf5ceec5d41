"""What the KubernetesRunner renders from a DurableCache (no API server needed): the coordinator
Deployment with no proxy of its own, the proxy Deployment joining it (spec.proxy's replicas, processes,
TLS, announced host, client limit, connection budget and resources reaching every pod), the join-token
Secret both mount, the two Services, the two PodDisruptionBudgets, the spread over zones and nodes.
(tests/kube/test_proxy_deployment.py creates them on a real API server.)"""

from __future__ import annotations

import ssl
from typing import Any

from cryptography import x509

from durablecache.fleettls import FleetTLS
from durablecache.k8s.runner import (
    ADMIN_PORT,
    COORDINATOR_PORT,
    FLEET_CERT_KEY,
    FLEET_KEY_KEY,
    PROXY_TLS_DIR,
    TEMPLATE_HASH,
    TOKEN_DIR,
    KubernetesRunner,
)


def resource(**proxy: Any) -> dict[str, Any]:
    return {"apiVersion": "durablecache.dev/v1alpha1", "kind": "DurableCache",
            "metadata": {"namespace": "shop", "name": "sessions", "uid": "u-1"},
            "spec": {"source": {"endpoints": [{"host": "10.0.0.1", "port": 6379}], "tls": {"enabled": True}},
                     "target": {"provider": "static", "durability": "sync",
                                "endpoints": [{"host": "10.0.0.2", "port": 6379}]},
                     "endpoint": {"secretName": "sessions-cache"}, "proxy": proxy}}


def runner(**kw: Any) -> KubernetesRunner:
    return KubernetesRunner(None, "durablecache:test", **kw)  # type: ignore[arg-type]  # rendering reads no API


def rendered(obj: dict[str, Any], **kw: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m["kind"], m["metadata"]["name"]): m for m in runner(**kw).manifests(obj)}


def pod_of(obj: dict[str, Any], deployment: str, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = rendered(obj, **kw)[("Deployment", deployment)]["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_everything_is_owned_and_created_secret_first() -> None:
    objs = runner(cluster_role="dc-worker").manifests(resource())
    assert [(m["kind"], m["metadata"]["name"]) for m in objs] == [
        ("Secret", "sessions-fleet-token"), ("Service", "sessions-coordinator"),
        ("PodDisruptionBudget", "sessions-worker"), ("Deployment", "sessions-worker"),
        ("Service", "sessions-proxy"), ("PodDisruptionBudget", "sessions-proxy"), ("Deployment", "sessions-proxy")]
    for m in objs:
        (ref,) = m["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("DurableCache", "sessions", "u-1", True)
        assert m["metadata"]["namespace"] == "shop"


def test_the_join_token_is_generated_and_mounted_in_both_pods_not_passed_on_a_command_line() -> None:
    objs = rendered(resource())
    token = objs[("Secret", "sessions-fleet-token")]["stringData"]["token"]
    assert len(token) == 64 and int(token, 16) >= 0
    # Generated anew at each rendering: ensure() creates the Secret once and never overwrites it.
    assert rendered(resource())[("Secret", "sessions-fleet-token")]["stringData"]["token"] != token
    for deployment in ("sessions-worker", "sessions-proxy"):
        pod, container = pod_of(resource(), deployment)
        (volume,) = [v for v in pod["volumes"] if v["name"] == "fleet-token"]
        assert volume["secret"] == {"secretName": "sessions-fleet-token", "defaultMode": 0o440,
                                    "items": [{"key": k, "path": k} for k in ("token", FLEET_CERT_KEY, FLEET_KEY_KEY)]}
        assert pod["securityContext"]["fsGroup"] == 10001      # readable by the image's group only
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "fleet-token"]
        assert (mount["mountPath"], mount["readOnly"]) == (TOKEN_DIR, True)
        assert flag(container["args"], "--join-token-file") == f"{TOKEN_DIR}/token"
        assert token not in " ".join(container["args"])


def test_the_fleet_certificate_is_made_with_the_token_and_both_pods_speak_tls_with_it(tmp_path) -> None:
    """The Secret holds a self-signed certificate and its key for the fleet's internal channels; both
    pods are given them as files (never their contents on a command line), so the coordinator's join
    and mark server and every proxy's admin API serve TLS and trust only that certificate."""
    data = rendered(resource())[("Secret", "sessions-fleet-token")]["stringData"]
    cert, key = data[FLEET_CERT_KEY], data[FLEET_KEY_KEY]
    assert cert.startswith("-----BEGIN CERTIFICATE-----") and key.startswith("-----BEGIN PRIVATE KEY-----")
    (tmp_path / "c").write_text(cert)
    (tmp_path / "k").write_text(key)
    tls = FleetTLS(str(tmp_path / "c"), str(tmp_path / "k"))     # the key matches the certificate
    assert tls.client.verify_mode == ssl.CERT_REQUIRED and tls.server.verify_mode == ssl.CERT_REQUIRED
    parsed = x509.load_pem_x509_certificate(cert.encode())
    assert parsed.issuer == parsed.subject and "shop/sessions" in parsed.subject.rfc4514_string()
    # A new one at each rendering, like the token: ensure() creates the Secret once.
    assert rendered(resource())[("Secret", "sessions-fleet-token")]["stringData"][FLEET_CERT_KEY] != cert
    for deployment in ("sessions-worker", "sessions-proxy"):
        _, container = pod_of(resource(), deployment)
        args = container["args"]
        assert flag(args, "--fleet-tls-cert") == f"{TOKEN_DIR}/{FLEET_CERT_KEY}"
        assert flag(args, "--fleet-tls-key") == f"{TOKEN_DIR}/{FLEET_KEY_KEY}"
        assert "PRIVATE KEY" not in " ".join(args)


def test_the_coordinator_runs_no_proxy_and_listens_for_joins_behind_its_service() -> None:
    obj = resource(tls={"secretName": "sessions-proxy-tls"}, processes=2, maxClients=9)
    objs = rendered(obj, cluster_role="dc-worker")
    deployment = objs[("Deployment", "sessions-worker")]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod, container = pod_of(obj, "sessions-worker", cluster_role="dc-worker")
    args = container["args"]
    assert args[args.index("worker"):][:3] == ["worker", "--resource", "shop/sessions"]
    assert (flag(args, "--proxies"), flag(args, "--coordinator-listen")) == ("0", f"0.0.0.0:{COORDINATOR_PORT}")
    # The proxies' settings are theirs: none of them on the coordinator.
    assert not {"--listen", "--tls-cert", "--announce", "--max-clients"} & set(args)
    assert [v["name"] for v in pod["volumes"]] == ["tmp", "fleet-token"]
    assert container["readinessProbe"]["tcpSocket"]["port"] == "fleet"
    assert pod["serviceAccountName"] == "sessions-durablecache-worker"
    service = objs[("Service", "sessions-coordinator")]
    assert service["spec"]["ports"] == [{"name": "fleet", "port": COORDINATOR_PORT, "targetPort": "fleet"}]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "coordinator"
    pdb = objs[("PodDisruptionBudget", "sessions-worker")]
    assert pdb["spec"] == {"maxUnavailable": 0, "selector": {"matchLabels": service["spec"]["selector"]}}


def test_the_proxy_pods_join_the_coordinator_with_every_setting() -> None:
    obj = resource(replicas=3, processes="auto", maxClients=500, maxClientsTotal=1000, connectionBudget=40000,
                   tls={"secretName": "sessions-proxy-tls"})
    objs = rendered(obj)
    deployment = objs[("Deployment", "sessions-proxy")]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod, container = pod_of(obj, "sessions-proxy")
    args = container["args"]
    assert args[args.index("proxy"):][:3] == ["proxy", "--join", f"sessions-coordinator.shop.svc:{COORDINATOR_PORT}"]
    assert flag(args, "--listen") == "0.0.0.0:6379"
    # The admin API on the pod IP, which READY announces: the coordinator connects to exactly that.
    assert (flag(args, "--admin"), flag(args, "--proxy-id")) == (f"$(POD_IP):{ADMIN_PORT}", "$(POD_NAME)")
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    assert env == {"POD_NAME": "metadata.name", "POD_IP": "status.podIP"}
    assert (flag(args, "--processes"), flag(args, "--max-clients"), flag(args, "--connection-budget")) == \
        ("auto", "500", "40000")
    assert flag(args, "--max-clients-total") == "333"     # this pod's share of the total, rounded down
    assert flag(args, "--announce") == "sessions-proxy.shop.svc"
    assert (flag(args, "--tls-cert"), flag(args, "--tls-key")) == \
        (f"{PROXY_TLS_DIR}/tls.crt", f"{PROXY_TLS_DIR}/tls.key")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "proxy-tls"]
    assert (volume["secret"]["secretName"], volume["secret"]["defaultMode"]) == ("sessions-proxy-tls", 0o440)
    assert [i["key"] for i in volume["secret"]["items"]] == ["tls.crt", "tls.key"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "proxy-tls"]
    assert (mount["mountPath"], mount["readOnly"]) == (PROXY_TLS_DIR, True)
    # No API access: no service account token, whatever identity the coordinator has.
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    assert container["readinessProbe"]["tcpSocket"]["port"] == "valkey"


def test_the_proxy_pods_spread_over_zones_and_nodes_and_go_one_at_a_time() -> None:
    objs = rendered(resource())
    selector = objs[("Deployment", "sessions-proxy")]["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "proxy"
    assert objs[("Deployment", "sessions-proxy")]["spec"]["replicas"] == 2     # the default
    pod, _ = pod_of(resource(), "sessions-proxy")
    assert [(c["topologyKey"], c["whenUnsatisfiable"], c["maxSkew"], c["labelSelector"])
            for c in pod["topologySpreadConstraints"]] == [
        ("topology.kubernetes.io/zone", "ScheduleAnyway", 1, {"matchLabels": selector}),
        ("kubernetes.io/hostname", "ScheduleAnyway", 1, {"matchLabels": selector})]
    pdb = objs[("PodDisruptionBudget", "sessions-proxy")]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    service = objs[("Service", "sessions-proxy")]
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [{"name": "valkey", "port": 6379, "targetPort": "valkey"}]
    # The two roles' selectors do not overlap: the clients' Service never sends to the coordinator.
    coordinator = objs[("Service", "sessions-coordinator")]["spec"]["selector"]
    assert coordinator != selector and not (coordinator.items() <= selector.items())


def test_without_a_tls_secret_nothing_is_mounted() -> None:
    pod, container = pod_of(resource(), "sessions-proxy")
    assert [v["name"] for v in pod["volumes"]] == ["tmp", "fleet-token"]
    assert "--tls-cert" not in container["args"] and "--connection-budget" not in container["args"]


def test_the_announced_host_is_the_service_s_dns_name_unless_set() -> None:
    _, container = pod_of(resource(), "sessions-proxy")
    assert flag(container["args"], "--announce") == "sessions-proxy.shop.svc"
    _, container = pod_of(resource(announceHost="cache.example.com"), "sessions-proxy")
    assert flag(container["args"], "--announce") == "cache.example.com"


def test_resources_reach_the_proxy_container() -> None:
    wanted = {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": 2}}
    _, container = pod_of(resource(resources=wanted, processes=2), "sessions-proxy")
    assert container["resources"] == wanted
    _, plain = pod_of(resource(), "sessions-proxy")
    assert "resources" not in plain


def test_resources_reach_the_coordinator_container_and_only_it() -> None:
    wanted = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    obj = resource()
    obj["spec"]["coordinator"] = {"resources": wanted}
    _, container = pod_of(obj, "sessions-worker")
    assert container["resources"] == wanted
    _, proxy = pod_of(obj, "sessions-proxy")
    assert "resources" not in proxy
    _, plain = pod_of(resource(), "sessions-worker")
    assert "resources" not in plain


def test_what_is_removed_at_the_end() -> None:
    """The pods first, then their Services and budgets, then the coordinator's identity; not the join-token
    Secret (the operator holds no delete on Secrets: the garbage collector takes it with its owner)."""
    assert runner(cluster_role="dc-worker").names(resource()) == [
        ("Deployment", "sessions-proxy"), ("Deployment", "sessions-worker"), ("Service", "sessions-proxy"),
        ("Service", "sessions-coordinator"), ("PodDisruptionBudget", "sessions-proxy"),
        ("PodDisruptionBudget", "sessions-worker"), ("RoleBinding", "sessions-durablecache-worker"),
        ("ServiceAccount", "sessions-durablecache-worker")]


def test_the_endpoint_keeps_its_transport_from_source_through_proxy_to_target() -> None:
    """What the operator writes into the applications' endpoint Secret at each route (handlers.address,
    endpoints.secret_data): valkeys:// from start to end when the source uses TLS and the proxy serves it."""
    from durablecache.k8s.endpoints import secret_data
    from durablecache.k8s.handlers import OperatorContext, Reconciler
    from durablecache.k8s.metrics import Metrics

    rec = Reconciler(OperatorContext(kube=None, runner=runner(), metrics=Metrics()), "shop", "sessions")  # type: ignore[arg-type]
    obj = resource(tls={"secretName": "sessions-proxy-tls"})
    obj["status"] = {"checkpoint": {"operator": {"source": {"host": "10.0.0.1", "port": 6379, "tls": True},
                                                 "target": {"host": "10.0.0.2", "port": 6379, "tls": True}}}}
    urls = [secret_data(*rec.address(obj, side))["url"] for side in ("source", "proxy", "target")]
    assert urls == ["valkeys://10.0.0.1:6379", "valkeys://sessions-proxy.shop.svc:6379", "valkeys://10.0.0.2:6379"]
    plain = resource()
    assert rec.address(plain, "proxy") == ("sessions-proxy.shop.svc", 6379, False)


def test_each_deployment_carries_the_hash_of_what_was_asked_for() -> None:
    """The operator patches the proxy Deployment when spec.proxy changes, and only then: the hash of the
    replicas and pod template it asked for stays the same for the same spec, whatever the API server
    adds to the stored object, and changes with the spec."""
    def hashes(**proxy: Any) -> dict[str, str]:
        objs = rendered(resource(**proxy))
        return {name: objs[("Deployment", name)]["metadata"]["annotations"][TEMPLATE_HASH]
                for name in ("sessions-proxy", "sessions-worker")}

    same, again = hashes(replicas=2), hashes(replicas=2)
    assert same == again
    scaled, other = hashes(replicas=3), hashes(replicas=2, processes=2)
    assert scaled["sessions-proxy"] != same["sessions-proxy"] != other["sessions-proxy"]
    assert scaled["sessions-worker"] == same["sessions-worker"] == other["sessions-worker"]
