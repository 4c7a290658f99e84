"""Unauthenticated probes of network ports, for the reliability cases (no SDK: what an attacker would send)."""

from __future__ import annotations

import http.client
import os
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # refused handshakes are the point; keep C-core quiet
import grpc  # noqa: E402
import psutil  # noqa: E402


@dataclass(frozen=True)
class HttpAnswer:
    """An HTTP response (status + start of the body), or ``error`` when none came back."""

    status: int | None
    body: bytes = b""
    error: str = ""

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 400


def listening_ports(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket the process listens on, straight from the kernel."""
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    tls: ssl.SSLContext | None = None,
    timeout: float = 5,
) -> HttpAnswer:
    cls = http.client.HTTPSConnection if tls is not None else http.client.HTTPConnection
    kwargs = {"context": tls} if tls is not None else {}
    conn = cls("127.0.0.1", port, timeout=timeout, **kwargs)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return HttpAnswer(resp.status, resp.read(4096))
    except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError and resets are OSErrors
        return HttpAnswer(None, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def multipart_form(field: str, filename: str, content: bytes) -> tuple[bytes, dict[str, str]]:
    """A browser-style multipart/form-data upload (what the filer's HTTP API accepted before)."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def tls_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client TLS context trusting ``ca`` (or nothing checked) with an optional client certificate."""
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    if ca is None:
        ctx.check_hostname = False
    if cert and key:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def grpc_status(
    port: int,
    method: str = "/filer_pb.SeaweedFiler/Ping",
    *,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    timeout: float = 5,
) -> grpc.StatusCode:
    """Status of one unary call with an empty message: plaintext when ``ca`` is None, else TLS.

    ``UNAVAILABLE`` means the call never reached a gRPC handler (no connection, or the TLS
    handshake was refused); any other code (OK, UNIMPLEMENTED, ...) means the server ran it.
    """
    target = f"127.0.0.1:{port}"
    if ca is None:
        channel = grpc.insecure_channel(target)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
        channel = grpc.secure_channel(target, creds)
    try:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(b"", timeout=timeout)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()
    finally:
        channel.close()
