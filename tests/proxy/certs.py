"""A throw-away CA and a server certificate for one DNS name (and no IP address), made with openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path


def certs_for(d: Path, dns_name: str) -> dict[str, str]:
    """Files in ``d``: the CA ("ca"), the server certificate ("cert") naming only ``dns_name``, its key."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=durablecache-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", f"/CN={dns_name}")
    Path(d, "ext.cnf").write_text(f"subjectAltName=DNS:{dns_name}\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": str(d / "ca.crt"), "cert": str(d / "server.crt"), "key": str(d / "server.key")}
