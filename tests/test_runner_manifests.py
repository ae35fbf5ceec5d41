"""The worker Deployment the KubernetesRunner renders from spec.proxy: the TLS Secret mounted and passed
on, the announced host (the proxy Service's DNS name by default), the container's resources.
(tests/kube/test_operator.py creates it on a real API server.)"""

from __future__ import annotations

from typing import Any

from durablecache.k8s.runner import PROXY_TLS_DIR, KubernetesRunner


def resource(**proxy: Any) -> dict[str, Any]:
    return {"apiVersion": "durablecache.dev/v1alpha1", "kind": "DurableCache",
            "metadata": {"namespace": "shop", "name": "sessions", "uid": "u-1"},
            "spec": {"source": {"endpoints": [{"host": "10.0.0.1", "port": 6379}], "tls": {"enabled": True}},
                     "target": {"provider": "static", "durability": "sync",
                                "endpoints": [{"host": "10.0.0.2", "port": 6379}]},
                     "endpoint": {"secretName": "sessions-cache"}, "proxy": proxy}}


def rendered(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    runner = KubernetesRunner(None, "durablecache:test")  # type: ignore[arg-type]  # rendering reads no API
    pod = runner.manifests(obj)["Deployment"]["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_the_tls_secret_is_mounted_and_passed_on() -> None:
    pod, container = rendered(resource(tls={"secretName": "sessions-proxy-tls"}))
    (volume,) = [v for v in pod["volumes"] if v["name"] == "proxy-tls"]
    assert volume["secret"]["secretName"] == "sessions-proxy-tls"
    assert [i["key"] for i in volume["secret"]["items"]] == ["tls.crt", "tls.key"]
    assert volume["secret"]["defaultMode"] == 0o440           # the key: not world-readable ...
    assert pod["securityContext"]["fsGroup"] == 10001           # ... but readable by the image's group
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "proxy-tls"]
    assert (mount["mountPath"], mount["readOnly"]) == (PROXY_TLS_DIR, True)
    args = container["args"]
    assert flag(args, "--tls-cert") == f"{PROXY_TLS_DIR}/tls.crt"
    assert flag(args, "--tls-key") == f"{PROXY_TLS_DIR}/tls.key"


def test_without_a_tls_secret_nothing_is_mounted() -> None:
    pod, container = rendered(resource())
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert "--tls-cert" not in container["args"] and "securityContext" not in pod


def test_the_announced_host_is_the_service_s_dns_name_unless_set() -> None:
    _, container = rendered(resource())
    assert flag(container["args"], "--announce") == "sessions-proxy.shop.svc"
    _, container = rendered(resource(announceHost="cache.example.com"))
    assert flag(container["args"], "--announce") == "cache.example.com"


def test_resources_reach_the_container() -> None:
    wanted = {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": 2}}
    _, container = rendered(resource(resources=wanted, processes=2))
    assert container["resources"] == wanted
    _, plain = rendered(resource())
    assert "resources" not in plain


def test_the_endpoint_keeps_its_transport_from_source_through_proxy_to_target() -> None:
    """What the operator writes into the applications' endpoint Secret at each route (handlers.address,
    endpoints.secret_data): valkeys:// from start to end when the source uses TLS and the proxy serves it."""
    from durablecache.k8s.endpoints import secret_data
    from durablecache.k8s.handlers import OperatorContext, Reconciler
    from durablecache.k8s.metrics import Metrics

    runner = KubernetesRunner(None, "durablecache:test")  # type: ignore[arg-type]
    rec = Reconciler(OperatorContext(kube=None, runner=runner, metrics=Metrics()), "shop", "sessions")  # type: ignore[arg-type]
    obj = resource(tls={"secretName": "sessions-proxy-tls"})
    obj["status"] = {"checkpoint": {"operator": {"source": {"host": "10.0.0.1", "port": 6379, "tls": True},
                                                 "target": {"host": "10.0.0.2", "port": 6379, "tls": True}}}}
    urls = [secret_data(*rec.address(obj, side))["url"] for side in ("source", "proxy", "target")]
    assert urls == ["valkeys://10.0.0.1:6379", "valkeys://sessions-proxy.shop.svc:6379", "valkeys://10.0.0.2:6379"]
    plain = resource()
    assert rec.address(plain, "proxy") == ("sessions-proxy.shop.svc", 6379, False)
