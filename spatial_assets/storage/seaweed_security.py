"""Credentials for every port of the bundled SeaweedFS besides S3: mutual TLS and JWT signing keys.

Why: ``weed mini`` serves S3 (SigV4, credentials checked) but also master, volume, filer and admin
HTTP ports and five gRPC ports on 127.0.0.1, none of which checks anything by default — a plain
``curl`` of the filer read and wrote objects behind S3's back, and the master's ``/col/delete``
deleted a bucket's volumes. Loopback is reachable by every local user, so binding to 127.0.0.1 is
not access control.

What this module generates once per state dir (directory 0700, files 0600) and weed reads through
``weed -config_dir=<dir>``:

* a private CA and one node certificate (EC P-256, 127.0.0.1/localhost) used by every weed service
  both as server and client identity: all gRPC ports (``[grpc.*]``) and the master, volume, filer
  and admin HTTP ports (``[https.*]`` with ``ca`` → client certificates required) accept only peers
  holding a certificate signed by that CA. The CA's private key is discarded after signing, so no
  other certificate can ever be minted for it.
* four JWT signing keys (``[jwt.signing]``, ``[jwt.signing.read]``, ``[jwt.filer_signing]``,
  ``[jwt.filer_signing.read]``): even a peer that got through TLS (or the filer's unix socket)
  must present a short-lived token minted by the master/S3 gateway to read or write a blob or a
  filer entry.

Only the S3 port speaks plain HTTP, and it refuses unsigned requests (``-s3.config`` identities).
Measured with weed 4.48: S3 (single and multipart uploads) keeps working; every other port answers a
plain request with "HTTP request to an HTTPS server" / a reset, and a TLS request without a client
certificate with "certificate required" (``spatial_assets_tests/storage/test_seaweed.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SECURITY_DIR", "SecurityFiles", "ensure_security", "new_identity"]

SECURITY_DIR = "security"
_CONFIG = "security.toml"
_CA = "ca.crt"
_CERT = "node.crt"
_KEY = "node.key"
# every [grpc.<component>] section weed 4.48 reads for its servers and clients
_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client", "msg_broker", "msg_agent", "mq")
_HTTPS_SERVERS = ("master", "volume", "filer", "admin")
_JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
_VALID_DAYS = 3650


@dataclass(frozen=True)
class SecurityFiles:
    """Where the generated material lives (``config_dir`` is what ``weed -config_dir=`` takes)."""

    config_dir: Path
    ca_cert: Path
    cert: Path
    key: Path

    @property
    def config(self) -> Path:
        return self.config_dir / _CONFIG


def _write_private(path: Path, data: bytes) -> None:
    """Create a 0600 file atomically (mode set before the first secret byte is written)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def new_identity() -> tuple[bytes, bytes, bytes]:
    """``(ca_pem, node_cert_pem, node_key_pem)``: a throwaway CA and one node identity it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=_VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"spatial_assets local SeaweedFS CA {secrets.token_hex(4)}")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seaweedfs")]))
        .issuer_name(ca_name)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        ca.public_bytes(pem),
        node.public_bytes(pem),
        node_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def _toml(files: SecurityFiles) -> str:
    def q(p: Path) -> str:
        return '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["# generated by spatial_assets.storage.seaweed_security; secrets: keep 0600", ""]
    for section in _JWT_SECTIONS:
        lines += [f"[{section}]", f'key = "{secrets.token_urlsafe(32)}"', "expires_after_seconds = 10", ""]
    lines += [
        "[access]", "ui = false", "",
        "[filer.expose_directory_metadata]", "enabled = false", "",
        "[grpc]", f"ca = {q(files.ca_cert)}", "",
    ]
    for comp in _GRPC_COMPONENTS:
        lines += [f"[grpc.{comp}]", f"cert = {q(files.cert)}", f"key = {q(files.key)}", ""]
    for comp in _HTTPS_SERVERS:  # ca set → client certificate required on these HTTP ports
        lines += [f"[https.{comp}]", f"cert = {q(files.cert)}", f"key = {q(files.key)}", f"ca = {q(files.ca_cert)}", ""]
    lines += [
        "[https.client]", "enabled = true",
        f"cert = {q(files.cert)}", f"key = {q(files.key)}", f"ca = {q(files.ca_cert)}", "",
    ]
    return "\n".join(lines)


def ensure_security(state_dir: Path) -> SecurityFiles:
    """The state dir's TLS identity and JWT keys, generated on first use and reused afterwards.

    A partial set (e.g. a crash between two writes) is regenerated whole, so weed never starts with
    a CA that did not sign its certificate.
    """
    config_dir = Path(state_dir).resolve() / SECURITY_DIR
    files = SecurityFiles(config_dir, config_dir / _CA, config_dir / _CERT, config_dir / _KEY)
    config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(config_dir, 0o700)
    if all(p.is_file() for p in (files.config, files.ca_cert, files.cert, files.key)):
        return files
    ca_pem, cert_pem, key_pem = new_identity()
    _write_private(files.key, key_pem)
    _write_private(files.cert, cert_pem)
    _write_private(files.ca_cert, ca_pem)
    _write_private(files.config, _toml(files).encode())  # last: its presence marks a complete set
    return files
