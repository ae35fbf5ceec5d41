"""The harness itself: servers really start, with auth, in cluster mode and with TLS."""

import valkey


def test_standalone_with_password_and_acl_user(make_server):
    server = make_server(password="pw", acl_user=("alice", "wonder"))
    assert server.client().ping()
    alice = server.client(username="alice", password="wonder")
    assert alice.set("k", "v") and alice.get("k") == b"v"
    try:
        server.client(password=None).get("k")
    except valkey.AuthenticationError:
        pass
    else:
        raise AssertionError("a client without a password was let in")


def test_cluster_with_replicas_owns_all_slots(make_cluster):
    cluster = make_cluster(primaries=3, replicas=1)
    client = cluster.cluster_client()
    for i in range(100):
        client.set(f"k{i}", i)
    assert sum(n.client().dbsize() for n in cluster.primaries) == 100
    info = cluster.nodes[0].client().execute_command("CLUSTER", "INFO").decode()
    assert "cluster_slots_assigned:16384" in info
    assert "cluster_known_nodes:6" in info


def test_tls_server_needs_tls(tls_server):
    assert tls_server.client().ping()
    plain = valkey.Valkey(host="127.0.0.1", port=tls_server.port, socket_timeout=2, password="tls-secret")
    try:
        plain.ping()
    except (valkey.ConnectionError, valkey.TimeoutError):
        pass
    else:
        raise AssertionError("the TLS port answered plain text")


def test_build_k8s_tools_prints_step_times_and_keys_its_cache_on_the_recipe(tmp_path):
    """scripts/build-k8s-tools.sh: CI's log shows how long each step took; the cache directory changes
    with the build recipe (GOFLAGS here), not with the script's messages."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "build-k8s-tools.sh"
    for name in ("etcd", "kube-apiserver", "kubectl", "helm"):  # "already built": nothing is compiled
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DURABLECACHE_TOOLS", "GOFLAGS")}
    out = subprocess.run(["bash", str(script)], env={**env, "DURABLECACHE_TOOLS": str(tmp_path)},
                         capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert "build-k8s-tools: helm already built" in out
    assert any(line.startswith("build-k8s-tools: all tools ready in 0m 0") for line in out), out
    assert out[-1] == str(tmp_path)

    def cache_dir(**extra: str) -> str:
        return subprocess.run(["bash", str(script), "--print-dir"], env={**env, **extra}, capture_output=True,
                              text=True, timeout=60, check=True).stdout.strip()

    assert cache_dir() == cache_dir()
    assert cache_dir(GOFLAGS="-race") != cache_dir()
