"""A worker that runs as a local process (no pod, so no mounted Secret) reads spec.proxy.tls.secretName
from the API: its proxies serve TLS with the Secret's certificate and key, written owner-only."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

from kubernetes import client as k8s_client

from durablecache.commands.worker import proxy_tls_files
from durablecache.k8s.kube import Kube
from durablecache.k8s.spec import DurableCacheSpec


def test_the_worker_reads_the_proxy_certificate_from_its_secret(kube_api: k8s_client.ApiClient,
                                                                 kube_namespace: str, tls_certs: dict[str, str],
                                                                 tmp_path: Path) -> None:
    cert, key = Path(tls_certs["cert"]).read_text(), Path(tls_certs["key"]).read_text()
    k8s_client.CoreV1Api(kube_api).create_namespaced_secret(kube_namespace, {
        "metadata": {"name": "proxy-tls"}, "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert, "tls.key": key}})
    obj = {"metadata": {"namespace": kube_namespace, "name": "sessions"},
           "spec": {"source": {"endpoints": [{"host": "127.0.0.1", "port": 6379}], "tls": {"enabled": True}},
                    "target": {"provider": "static", "durability": "sync",
                               "endpoints": [{"host": "127.0.0.1", "port": 6380}]},
                    "endpoint": {"secretName": "app-cache"}, "proxy": {"tls": {"secretName": "proxy-tls"}}}}
    spec = DurableCacheSpec.parse(obj)
    no_files = argparse.Namespace(tls_cert=None, tls_key=None)
    cert_file, key_file = proxy_tls_files(Kube(kube_api), spec, no_files, str(tmp_path))
    assert cert_file and key_file
    assert (Path(cert_file).read_text(), Path(key_file).read_text()) == (cert, key)
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    # Mounted files (the pod) win; no Secret named: plain TCP.
    mounted = argparse.Namespace(tls_cert="/etc/x/tls.crt", tls_key="/etc/x/tls.key")
    assert proxy_tls_files(Kube(kube_api), spec, mounted, str(tmp_path)) == ("/etc/x/tls.crt", "/etc/x/tls.key")
    del obj["spec"]["proxy"]
    assert proxy_tls_files(Kube(kube_api), DurableCacheSpec.parse(obj), no_files, str(tmp_path)) == (None, None)
