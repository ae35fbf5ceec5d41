"""TLS on a fleet's internal channels (docs/ha.md, "Transport"): the mark channel (a proxy's join and
its MARK frames to the coordinator) and each proxy's admin API (the coordinator's instructions).

The whole fleet shares one certificate and its key. Every server on these channels presents it and
asks its peer for it; every client pins it as its only trust anchor and presents it too. So both ends
of each connection prove they hold the fleet's key, and nothing else verifies, whatever CA a system
trusts. Host names are not checked: proxies are reached at their pod IPs, which no certificate made
in advance can name; the pinned certificate is what identifies the peer.

The operator makes the certificate once per migration (``make_certificate``) and keeps it in the
join-token Secret (k8s/runner.py). ``durablecache`` commands take it as ``--fleet-tls-cert`` and
``--fleet-tls-key``; without them the channels are plain TCP (loopback, or a network you trust).
"""

from __future__ import annotations

import argparse
import datetime
import ssl

from .errors import ConnectError, UsageError

CERT_VALID_DAYS = 3650          # longer than any migration: an expiry mid-migration would stop the fleet
HANDSHAKE_TIMEOUT = 10.0        # seconds a server waits for a peer's TLS handshake
CERT_FLAGS = ("--fleet-tls-cert", "--fleet-tls-key")


class TLSRefused(ConnectError):
    """The peer's end of an internal channel does not speak the same transport (TLS with the fleet's
    certificate, or plain TCP). Trying again does not help: the configuration must change."""


class FleetTLS:
    """The fleet's certificate and key (PEM files), as the contexts both ends of a channel use."""

    def __init__(self, cert: str, key: str):
        self.cert, self.key = cert, key
        self.server = self._context(ssl.PROTOCOL_TLS_SERVER)   # checks the files once, at start
        self.client = self._context(ssl.PROTOCOL_TLS_CLIENT)

    def _context(self, protocol: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3     # both ends are durablecache: no older version needed
        if protocol == ssl.PROTOCOL_TLS_CLIENT:
            ctx.check_hostname = False     # pod IPs: the pinned certificate identifies the peer, not a name
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_cert_chain(self.cert, self.key)
            ctx.load_verify_locations(cafile=self.cert)  # the fleet's certificate is the only trust anchor
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load {CERT_FLAGS[0]} {self.cert} / {CERT_FLAGS[1]} {self.key}: {exc}") from None
        return ctx


def add_arguments(p: argparse.ArgumentParser, role: str) -> None:
    """--fleet-tls-cert/--fleet-tls-key; ``role`` says which channels the command serves and calls."""
    p.add_argument(CERT_FLAGS[0], metavar="PEM",
                   help=f"TLS on the fleet's internal channels ({role}) with this certificate, which is also the "
                        "only one trusted from the other end; every member of the fleet is given the same (the "
                        "operator's join-token Secret holds it). Without it: plain TCP (docs/ha.md, Transport)")
    p.add_argument(CERT_FLAGS[1], metavar="PEM", help=f"the private key of {CERT_FLAGS[0]}")


def from_flags(cert: str | None, key: str | None) -> FleetTLS | None:
    """The fleet's TLS from the two flags (both or neither), or None for plain TCP."""
    if not (cert or key):
        return None
    if not (cert and key):
        raise UsageError(f"{CERT_FLAGS[0]} and {CERT_FLAGS[1]} go together")
    return FleetTLS(cert, key)


def refused(who: str, why: object, tls: bool) -> TLSRefused:
    """The clear error for a peer whose transport is not ours: a failed TLS handshake, or a peer that
    does not answer in plain TCP."""
    if tls:
        return TLSRefused(f"{who} refused TLS with this fleet's certificate, or is not ours ({why}): both ends "
                          f"need {CERT_FLAGS[0]} with the same certificate")
    return TLSRefused(f"{who} did not answer in plain TCP ({why}); it may serve the fleet's TLS: give this end "
                      f"{CERT_FLAGS[0]} and {CERT_FLAGS[1]} too")


def make_certificate(common_name: str, days: int = CERT_VALID_DAYS) -> tuple[str, str]:
    """A new self-signed certificate and its key (PEM text each) for one fleet: an ECDSA P-256 key,
    usable by servers and clients alike. The key is returned, never logged."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))     # clocks of the pods may differ a little
            .not_valid_after(now + datetime.timedelta(days=days))
            # Its own issuer: a CA (for the verifier's sake) that may sign nothing below itself.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("durablecache-fleet")]), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()
