"""Case: no port of the bundled SeaweedFS serves or accepts data without credentials.

Before the fix the filer port served ``/buckets/<bucket>/<key>`` to a plain ``curl`` (200, the
object's bytes), a multipart POST there wrote an object S3 then served, and the master's
``/col/delete`` dropped a bucket's volumes. The ports probed are read from the kernel
(``net_connections`` of the weed process), not from the list of ports we passed, so a service
added by a future weed version is probed too.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import psutil
import pytest

from spatial_assets.storage.objectstore import S3Settings
from spatial_assets.storage.seaweed import SeaweedS3, fixed_socket_paths
from spatial_assets.storage.seaweed_security import new_identity
from spatial_assets_tests.reliability.probes import (
    grpc_status,
    http_request,
    listening_ports,
    multipart_form,
    tls_context,
)

SECRET = b"curated references manifest - must not leak"


def _all_services_up(server: SeaweedS3, timeout: float = 30) -> set[int]:
    """Wait until at least every service we started listens (they come up one after another)."""
    ours = set(server.ports.values()) | {server.ports["admin"] + 10000}
    deadline = time.monotonic() + timeout
    while True:
        ports = {p for _, p in listening_ports(server.pid)}
        if ours <= ports or time.monotonic() > deadline:
            return ports
        time.sleep(0.3)


@pytest.fixture()
def foreign_identity(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA + client certificate that is *not* the server's: must be refused like no certificate."""
    ca, cert, key = new_identity()
    paths = tmp_path / "foreign_ca.crt", tmp_path / "foreign.crt", tmp_path / "foreign.key"
    for p, data in zip(paths, (ca, cert, key)):
        p.write_bytes(data)
    return paths


def test_every_listening_port_refuses_unauthenticated_requests(
    s3_server: SeaweedS3, s3_settings: S3Settings, s3_bucket: str, foreign_identity: tuple[Path, Path, Path]
) -> None:
    key = "manifests/references.yaml"
    signed = s3_settings.client()
    signed.put_object(Bucket=s3_bucket, Key=key, Body=SECRET)
    sec = s3_server.security
    s3_port = s3_server.ports["s3"]
    ports = _all_services_up(s3_server)
    assert {ip for ip, _ in listening_ports(s3_server.pid)} == {"127.0.0.1"}
    assert s3_port in ports and len(ports) >= 10  # master, volume, filer, s3, admin: http + grpc each
    paths = [f"/buckets/{s3_bucket}/{key}", f"/{s3_bucket}/{key}", "/col/delete?collection=" + s3_bucket, "/dir/assign", "/"]
    form, form_headers = multipart_form("file", "evil.yaml", b"injected")
    # 1. plain HTTP on every port, no signature: never a success, never the object's bytes, never a write
    for port in sorted(ports):
        answers = [http_request(port, "GET", p) for p in paths]
        answers.append(http_request(port, "POST", f"/buckets/{s3_bucket}/evil.yaml", form, form_headers))
        answers.append(http_request(port, "PUT", f"/{s3_bucket}/evil.yaml", b"injected"))
        for a in answers:
            assert not a.accepted, f"port {port} accepted an unauthenticated request: {a}"
            assert SECRET not in a.body
        if port == s3_port:
            assert {a.status for a in answers} <= {400, 403, 405}, answers  # SigV4 refused / malformed, nothing else
    seen: dict[int, str] = {s3_port: "s3"}
    for port in sorted(ports - {s3_port}):
        # 2. TLS without a client certificate, and with one from another CA: handshake refused
        for ctx in (tls_context(sec.ca_cert), tls_context(sec.ca_cert, *foreign_identity[1:])):
            a = http_request(port, "GET", paths[0], tls=ctx)
            assert a.status is None, f"port {port} answered TLS without our client certificate: {a}"
        # 3. gRPC: plaintext, TLS without a certificate and with a foreign one never reach a handler
        assert grpc_status(port) == grpc.StatusCode.UNAVAILABLE, f"port {port} ran a plaintext gRPC call"
        assert grpc_status(port, ca=sec.ca_cert) == grpc.StatusCode.UNAVAILABLE
        assert grpc_status(port, ca=sec.ca_cert, cert=foreign_identity[1], key=foreign_identity[2]) == grpc.StatusCode.UNAVAILABLE
        # 4. positive control (the probes can fail): our certificate gets through, to HTTP or gRPC
        a = http_request(port, "GET", paths[0], tls=tls_context(sec.ca_cert, sec.cert, sec.key))
        if a.status is not None:
            seen[port] = "https"
            assert SECRET not in a.body or a.status >= 400  # the filer still wants a JWT to read
        else:
            code = grpc_status(port, ca=sec.ca_cert, cert=sec.cert, key=sec.key)
            assert code != grpc.StatusCode.UNAVAILABLE, f"port {port}: neither HTTPS nor gRPC with our certificate"
            seen[port] = "grpc"
    kinds = sorted(seen.values())
    assert kinds.count("s3") == 1 and kinds.count("https") >= 4 and kinds.count("grpc") >= 5, seen
    # nothing got in: the bucket holds exactly the one object, unchanged
    listing = signed.list_objects_v2(Bucket=s3_bucket)
    assert [o["Key"] for o in listing.get("Contents", [])] == [key]
    assert signed.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == SECRET


def test_unix_sockets_and_security_files_are_owner_only(s3_server: SeaweedS3) -> None:
    _all_services_up(s3_server)
    sockets = [Path(c.laddr) for c in psutil.Process(s3_server.pid).net_connections(kind="unix") if c.laddr]
    assert sockets, "weed listens on unix sockets (filer.sock, s3.sock, gRPC sockets in /tmp)"
    for path in sockets:
        assert path.exists(), path
        assert path.stat().st_mode & 0o077 == 0, f"{path} is reachable by other users: {oct(path.stat().st_mode)}"
    assert {p for p in fixed_socket_paths(s3_server.ports) if p.exists()} <= set(sockets)
    sec = s3_server.security
    assert sec.config_dir.stat().st_mode & 0o777 == 0o700
    assert s3_server.data_dir.stat().st_mode & 0o777 == 0o700
    for f in (sec.config, sec.ca_cert, sec.cert, sec.key):
        assert f.stat().st_mode & 0o777 == 0o600, f
    config = sec.config.read_text()
    for section in ("[jwt.signing]", "[jwt.signing.read]", "[jwt.filer_signing]", "[jwt.filer_signing.read]"):
        assert section in config
    assert 'key = ""' not in config  # every signing key set
