"""A real Kubernetes control plane for the operator, CRD and chart tests.

Starts etcd and kube-apiserver the way controller-runtime's envtest does: free loopback ports,
temporary directories, a throwaway CA with a serving certificate and an admin client certificate
(group system:masters), RBAC authorization, service-account signing keys and issuer, and no admission
plugin that needs a controller. There is no kubelet and no controller-manager: pods never run,
namespaces never finish deleting, so tests use fresh namespaces instead of cleaning up.

The binaries come from ``scripts/build-k8s-tools.sh`` (cached outside the repository); the directory is
``$DURABLECACHE_TOOLS`` or what that script prints with ``--print-dir``. Missing binaries fail the
session with the command that builds them.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import shutil
import signal
import ssl
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from durablecache.ports import free_port
from durablecache.testing.waiting import wait_answering, wait_for

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-k8s-tools.sh"
BUILD_HINT = f"bash {BUILD_SCRIPT.relative_to(REPO)}"
TOOLS = ("etcd", "kube-apiserver", "kubectl", "helm")
CRD_FILE = REPO / "crds" / "durablecache.yaml"
CHART_DIR = REPO / "charts" / "durablecache-operator"

# Bounds for every wait: a stuck process fails the session instead of hanging CI.
ETCD_READY_TIMEOUT = 30.0
APISERVER_READY_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
COMMAND_TIMEOUT = 60.0
START_ATTEMPTS = 3  # a free port can be taken between probing and binding; retry with new ones


def tools_dir() -> Path:
    """Where build-k8s-tools.sh puts (or put) the binaries."""
    env = os.environ.get("DURABLECACHE_TOOLS")
    if env:
        return Path(env)
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-dir"], capture_output=True, text=True,
                         check=True, timeout=COMMAND_TIMEOUT)
    return Path(out.stdout.strip().splitlines()[-1])


def tool_path(name: str) -> Path:
    """A built binary, or a test failure that says how to build it (never a skip)."""
    path = tools_dir() / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} is not built ({path} missing); build the Kubernetes test tools with: "
                    f"{BUILD_HINT}", pytrace=False)
    return path


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=COMMAND_TIMEOUT)


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path  # RSA private key: signs service-account tokens, its public half verifies them


def make_pki(d: Path) -> Pki:
    """A CA, a serving certificate for 127.0.0.1 and an admin client certificate, made with openssl."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is required (scripts/system-deps.sh installs it)", pytrace=False)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=durablecache-test-kube-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")

    def leaf(name: str, subj: str, ext: str) -> None:
        _openssl(d, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj)
        (d / f"{name}.ext").write_text(ext)
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")

    leaf("serving", "/CN=kube-apiserver",
         "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
         "keyUsage=critical,digitalSignature,keyEncipherment\n")
    # O=system:masters: the admin is authorized by group membership, not by any RBAC binding.
    leaf("admin", "/O=system:masters/CN=durablecache-test-admin",
         "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n")
    _openssl(d, "genrsa", "-out", "sa.key", "2048")
    return Pki(ca_cert=d / "ca.crt", ca_key=d / "ca.key", serving_cert=d / "serving.crt",
               serving_key=d / "serving.key", admin_cert=d / "admin.crt", admin_key=d / "admin.key",
               sa_key=d / "sa.key")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, bounded wait, then SIGKILL: exactly the process we started (its own session)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def write_kubeconfig(path: Path, server: str, ca: Path, user: dict[str, str], name: str) -> Path:
    """A kubeconfig with one cluster, one user and one current context."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode()}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": "test", "user": name}}],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@dataclass
class KubeEnv:
    """A running etcd + kube-apiserver pair and how to talk to it."""

    workdir: Path
    tools: Path
    server: str = ""
    etcd_url: str = ""
    pki: Pki | None = None
    kubeconfig: Path = Path()
    etcd: subprocess.Popen[bytes] | None = None
    apiserver: subprocess.Popen[bytes] | None = None

    @property
    def kubectl_path(self) -> Path:
        return self.tools / "kubectl"

    @property
    def helm_path(self) -> Path:
        return self.tools / "helm"

    def kubectl(self, *args: str, kubeconfig: Path | None = None, stdin: str | None = None,
                check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this API server (as admin unless another kubeconfig is given)."""
        cmd = [str(self.kubectl_path), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args]
        result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout,
                                env=self.tool_env())
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def wait_established(self, *crds: str, timeout: float = 30.0) -> None:
        """Until each CRD's Established condition is True. Polled with kubectl get, not `kubectl wait`:
        that fails at once ("status.conditions accessor error") while the API server has not yet
        written the new CRD's conditions, as on a loaded machine."""
        path = '{.status.conditions[?(@.type=="Established")].status}'

        def established(crd: str) -> bool:
            return self.kubectl("get", f"crd/{crd}", "-o", f"jsonpath={path}", check=False).stdout == "True"

        for crd in crds:
            wait_for(f"CRD {crd} Established", functools.partial(established, crd), timeout, interval=0.2)

    def helm(self, *args: str, check: bool = True,
             timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run helm with its state directories inside this environment, never the user's."""
        result = subprocess.run([str(tool_path("helm")), "--kubeconfig", str(self.kubeconfig), *args],
                                capture_output=True, text=True, timeout=timeout, env=self.tool_env())
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def process_env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        """Environment for a process under test (e.g. the operator) talking to this API server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        return env

    def tool_env(self) -> dict[str, str]:
        home = self.workdir / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HELM_"))}
        env.update(HOME=str(home), HELM_CACHE_HOME=str(home / "helm-cache"),
                   HELM_CONFIG_HOME=str(home / "helm-config"), HELM_DATA_HOME=str(home / "helm-data"),
                   KUBECACHEDIR=str(home / "kube-cache"))
        return env

    def start(self) -> None:
        etcd_bin, apiserver_bin = tool_path("etcd"), tool_path("kube-apiserver")
        tool_path("kubectl")
        self.pki = make_pki(self.workdir)
        errors: list[str] = []
        for attempt in range(START_ATTEMPTS):
            try:
                self._start_etcd(etcd_bin, attempt)
                self._start_apiserver(apiserver_bin, attempt)
                return
            except RuntimeError as exc:  # port race or slow start: log it and try fresh ports
                errors.append(str(exc))
                self.stop()
        pytest.fail("could not start the test control plane:\n" + "\n---\n".join(errors), pytrace=False)

    def _start_etcd(self, binary: Path, attempt: int) -> None:
        client, peer = free_port(), free_port()
        data = self.workdir / f"etcd-data-{attempt}"
        log = self.workdir / f"etcd-{attempt}.log"
        self.etcd_url = f"http://127.0.0.1:{client}"
        args = [str(binary), "--name", "durablecache-test", "--data-dir", str(data),
                "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"durablecache-test=http://127.0.0.1:{peer}",
                # Throwaway data: skipping fsync makes the API server several times faster on shared disks.
                "--unsafe-no-fsync", "--log-level", "warn"]
        with log.open("wb") as out:
            self.etcd = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready("etcd", self.etcd, log, f"{self.etcd_url}/health", ETCD_READY_TIMEOUT, tls=False)

    def _start_apiserver(self, binary: Path, attempt: int) -> None:
        assert self.pki is not None
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        log = self.workdir / f"kube-apiserver-{attempt}.log"
        certs = self.workdir / f"apiserver-certs-{attempt}"
        certs.mkdir(exist_ok=True)
        p = self.pki
        args = [str(binary),
                "--advertise-address=127.0.0.1", "--bind-address=127.0.0.1", f"--secure-port={port}",
                f"--cert-dir={certs}",
                f"--etcd-servers={self.etcd_url}",
                f"--tls-cert-file={p.serving_cert}", f"--tls-private-key-file={p.serving_key}",
                f"--client-ca-file={p.ca_cert}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={p.sa_key}",
                f"--service-account-signing-key-file={p.sa_key}",
                f"--service-account-issuer={self.server}",
                "--service-cluster-ip-range=10.0.0.0/24",
                # ServiceAccount admission would demand token controllers that do not run here.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=0"]
        with log.open("wb") as out:
            self.apiserver = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True)
        self._wait_ready("kube-apiserver", self.apiserver, log, f"{self.server}/readyz",
                         APISERVER_READY_TIMEOUT, tls=True)
        self.kubeconfig = write_kubeconfig(
            self.workdir / "admin.kubeconfig", self.server, p.ca_cert,
            {"client-certificate": str(p.admin_cert), "client-key": str(p.admin_key)}, "admin")

    def _wait_ready(self, what: str, proc: subprocess.Popen[bytes], log: Path, url: str,
                    timeout: float, *, tls: bool) -> None:
        context = None
        if tls:
            assert self.pki is not None
            context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
            context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        try:
            wait_answering(url, proc, timeout, context=context, describe=lambda: f"{what}:\n{_tail(log)}")
        except AssertionError as exc:   # start() tries again on fresh ports
            raise RuntimeError(str(exc)) from None

    def stop(self) -> None:
        _stop(self.apiserver)
        _stop(self.etcd)
        self.apiserver = self.etcd = None


@pytest.fixture(scope="session")
def kube_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeEnv]:
    """etcd + kube-apiserver for the whole session."""
    env = KubeEnv(workdir=tmp_path_factory.mktemp("kube"), tools=tools_dir())
    try:
        env.start()
        yield env
    finally:
        env.stop()


@pytest.fixture(scope="session")
def kubeconfig(kube_env: KubeEnv) -> Path:
    """Path of an admin (system:masters) kubeconfig for the test API server."""
    return kube_env.kubeconfig


@pytest.fixture(scope="session")
def kubectl(kube_env: KubeEnv) -> Path:
    """Path of the kubectl binary built by scripts/build-k8s-tools.sh."""
    return kube_env.kubectl_path


@pytest.fixture(scope="session")
def helm(kube_env: KubeEnv) -> Path:
    """Path of the helm binary built by scripts/build-k8s-tools.sh."""
    return tool_path("helm")


@pytest.fixture(scope="session")
def kube_api(kubeconfig: Path) -> Iterator[k8s_client.ApiClient]:
    """A ``kubernetes.client.ApiClient`` authenticated as the admin."""
    api = k8s_config.new_client_from_config(config_file=str(kubeconfig))
    yield api
    api.close()


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def kube_namespace(kube_env: KubeEnv) -> str:
    """A fresh namespace per test (namespaces never finish deleting without a controller-manager)."""
    name = _unique("t")
    kube_env.kubectl("create", "namespace", name)
    return name


@pytest.fixture(scope="session")
def crd_installed(kube_env: KubeEnv) -> str:
    """The DurableCache CRD from crds/durablecache.yaml, applied and Established."""
    # --force-conflicts: a helm release in this session may own the CRD's fields already.
    kube_env.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    name = "durablecaches.durablecache.dev"
    kube_env.wait_established(name)
    # Established comes before discovery and the published OpenAPI catch up; wait (bounded) until
    # kubectl can resolve the short name and read the schema, as a user's kubectl would.
    def explain() -> subprocess.CompletedProcess[str]:
        return kube_env.kubectl("explain", "dcache.spec", check=False)

    wait_for(f"kubectl to read CRD {name}'s schema", lambda: explain().returncode == 0, 30,
             describe=lambda: explain().stderr)
    return name


ServiceAccountKubeconfig = Callable[..., Path]


@pytest.fixture(scope="session")
def sa_kubeconfig(kube_env: KubeEnv) -> ServiceAccountKubeconfig:
    """Factory ``sa_kubeconfig(namespace, name, bind_cluster_role=None) -> Path``.

    Creates the namespace (if needed) and ServiceAccount, optionally binds a ClusterRole to it, and
    returns a kubeconfig that authenticates with a bound token from the TokenRequest API, so a test
    acts exactly as a pod running under that service account would.
    """
    made: dict[tuple[str, str], Path] = {}

    def make(namespace: str, name: str, bind_cluster_role: str | None = None,
             expiration_seconds: int = 3600) -> Path:
        key = (namespace, name)
        if key in made and bind_cluster_role is None:
            return made[key]
        ns = kube_env.kubectl("get", "namespace", namespace, check=False)
        if ns.returncode != 0:
            kube_env.kubectl("create", "namespace", namespace)
        kube_env.kubectl("-n", namespace, "create", "serviceaccount", name, check=False)
        kube_env.kubectl("-n", namespace, "get", "serviceaccount", name)
        if bind_cluster_role:
            kube_env.kubectl("create", "clusterrolebinding", _unique(f"{name}-{bind_cluster_role}")[:63],
                             f"--clusterrole={bind_cluster_role}",
                             f"--serviceaccount={namespace}:{name}")
        token = kube_env.kubectl("-n", namespace, "create", "token", name,
                                 f"--duration={expiration_seconds}s").stdout.strip()
        assert token.count(".") == 2, "TokenRequest did not return a JWT"
        path = write_kubeconfig(kube_env.workdir / f"sa-{namespace}-{name}.kubeconfig", kube_env.server,
                                kube_env.pki.ca_cert if kube_env.pki else Path(), {"token": token},
                                f"system:serviceaccount:{namespace}:{name}")
        made[key] = path
        return path

    return make


@dataclass(frozen=True)
class OperatorRelease:
    """The chart installed for real: the operator's identity and the peering it uses."""

    release: str
    namespace: str
    service_account: str
    cluster_role: str
    peering: str
    kubeconfig: Path  # authenticates as the chart's ServiceAccount, authorized only by the chart's RBAC


def adopt_for_helm(env: KubeEnv, kind: str, name: str, release: str, namespace: str) -> None:
    """Mark an existing cluster object as owned by a release, as Helm requires before it takes it over."""
    if env.kubectl("get", kind, name, check=False).returncode != 0:
        return
    env.kubectl("label", "--overwrite", kind, name, "app.kubernetes.io/managed-by=Helm")
    env.kubectl("annotate", "--overwrite", kind, name, f"meta.helm.sh/release-name={release}",
                f"meta.helm.sh/release-namespace={namespace}")


@pytest.fixture(scope="session")
def operator_release(kube_env: KubeEnv, crd_installed: str,
                     sa_kubeconfig: ServiceAccountKubeconfig) -> OperatorRelease:
    """``helm install`` of charts/durablecache-operator (its Deployment never runs: there is no kubelet).

    The operator's end-to-end tests run the operator as a local process with ``kubeconfig`` and
    ``--peering=<peering>``, so it has exactly the permissions the chart grants. The CRD stays as
    ``crd_installed`` applied it (crds.enabled=false), so the two fixtures never fight over it.
    """
    release, namespace = "durablecache-operator", "durablecache-system"
    kube_env.helm("install", release, str(CHART_DIR), "--namespace", namespace, "--create-namespace",
                  "--set", "crds.enabled=false", timeout=120)
    manifest = kube_env.helm("get", "manifest", release, "--namespace", namespace).stdout
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    # The worker's ClusterRole is the chart's second one; the operator's is the one without that label.
    names = {d["kind"]: d["metadata"]["name"] for d in docs
             if d.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component") != "worker"}
    # The ServiceAccount exists (created by the chart); this only mints a token for it.
    path = sa_kubeconfig(namespace, names["ServiceAccount"])
    return OperatorRelease(release=release, namespace=namespace, service_account=names["ServiceAccount"],
                           cluster_role=names["ClusterRole"], peering=names["ClusterKopfPeering"],
                           kubeconfig=path)


LOCAL_WORKER = "local-worker"


@pytest.fixture
def worker_kubeconfig(kube_env: KubeEnv, operator_release: OperatorRelease, kube_namespace: str,
                      sa_kubeconfig: ServiceAccountKubeconfig) -> Path:
    """A token of a ServiceAccount holding the chart's worker ClusterRole in this test's namespace only
    (a RoleBinding, as the operator makes for each worker pod): the local workers run as it, so they
    have exactly a worker pod's rights."""
    path = sa_kubeconfig(kube_namespace, LOCAL_WORKER)
    kube_env.kubectl("-n", kube_namespace, "create", "rolebinding", LOCAL_WORKER,
                     f"--clusterrole={operator_release.cluster_role}-worker",
                     f"--serviceaccount={kube_namespace}:{LOCAL_WORKER}")
    return path


# -- the operator's end-to-end tests: moto in server mode for the aws provider --------------------

MOTO_SERVER = REPO / "tests" / "aws" / "motoserver.py"
MOTO_START_TIMEOUT = 30.0
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """tests/aws/motoserver.py (moto plus ElastiCache's durability read-back) on a free loopback port."""
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_TEST_ENV, DC_MOTO_POLLS="1")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_answering(f"{url}/moto-api/data.json", proc, MOTO_START_TIMEOUT, describe=lambda: _tail(log))
        yield url
    finally:
        _stop(proc)
