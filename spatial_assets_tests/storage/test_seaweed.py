"""The local S3 server: access control, loopback binding, explicit ports, credentials, detached reuse."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import psutil
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from spatial_assets.storage.objectstore import S3Settings
from spatial_assets.storage.seaweed import (
    CREDENTIALS_FILE,
    STATE_FILE,
    SeaweedError,
    SeaweedS3,
    ensure_bucket,
    ensure_running,
    free_ports,
    load_credentials,
    stop_running,
)


def _listening(pid: int) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def test_anonymous_requests_are_refused_signed_ones_work(s3_settings: S3Settings, s3_bucket: str) -> None:
    signed = s3_settings.client()
    signed.put_object(Bucket=s3_bucket, Key="secret.txt", Body=b"hello")
    assert signed.get_object(Bucket=s3_bucket, Key="secret.txt")["Body"].read() == b"hello"

    anon = boto3.client(
        "s3", endpoint_url=s3_settings.endpoint_url, region_name="us-east-1", config=Config(signature_version=UNSIGNED)
    )
    for call in (
        lambda: anon.get_object(Bucket=s3_bucket, Key="secret.txt"),
        lambda: anon.list_objects_v2(Bucket=s3_bucket),
        lambda: anon.put_object(Bucket=s3_bucket, Key="anon.txt", Body=b"x"),
    ):
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # plain HTTP, no SDK at all
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(f"{s3_settings.endpoint_url}/{s3_bucket}/secret.txt", timeout=5)
    assert http_err.value.code == 403
    # a wrong secret is refused too
    wrong = S3Settings(s3_settings.endpoint_url, s3_settings.access_key_id, "not-the-secret", "us-east-1").client()
    with pytest.raises(ClientError) as err:
        wrong.get_object(Bucket=s3_bucket, Key="secret.txt")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert signed.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 1  # the anonymous PUT did not land


def test_session_server_listens_only_on_loopback_on_its_chosen_ports(s3_server: SeaweedS3) -> None:
    expected = set(s3_server.ports.values()) | {s3_server.ports["admin"] + 10000}
    # services come up one after another (S3 answering does not mean the admin worker listens yet)
    deadline = time.monotonic() + 30
    listening = _listening(s3_server.pid)
    while {port for _, port in listening} != expected and time.monotonic() < deadline:
        assert {port for _, port in listening} <= expected  # never a port we did not pass
        time.sleep(0.5)
        listening = _listening(s3_server.pid)
    assert {ip for ip, _ in listening} == {"127.0.0.1"}
    assert {port for _, port in listening} == expected  # every service on the port we passed, and only those
    assert s3_server.endpoint_url == f"http://127.0.0.1:{s3_server.ports['s3']}"
    data = s3_server.data_dir
    assert (data / "filer.sock").exists() and (data / "s3.sock").exists()  # sockets inside the data dir


def test_requested_port_is_used_and_a_taken_port_fails_loudly(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    server = SeaweedS3(tmp_path / "a", s3_port=port)
    try:
        settings = server.start(timeout=30)
        assert settings.endpoint_url == f"http://127.0.0.1:{port}"
        assert ("127.0.0.1", port) in _listening(server.pid)
        # a second server asking for the same port must not silently move elsewhere
        with pytest.raises(SeaweedError, match=str(port)):
            SeaweedS3(tmp_path / "b", s3_port=port).start(timeout=15)
    finally:
        server.stop(graceful=False)


def test_credentials_generated_once_private_and_reused_with_the_data(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = SeaweedS3(state)
    first = server.start(timeout=30)
    cred_file = state / CREDENTIALS_FILE
    try:
        assert stat.S_IMODE(cred_file.stat().st_mode) == 0o600
        assert first.access_key_id and first.secret_access_key and len(first.secret_access_key) >= 32
        with pytest.raises(SeaweedError, match="already serves"):  # never two servers on one data dir
            SeaweedS3(state).start(timeout=5)
        ensure_bucket(first, "keep-me")
        first.client().put_object(Bucket="keep-me", Key="k", Body=b"survives a SIGKILL")
    finally:
        admin_sock = Path(f"/tmp/seaweedfs-admin-grpc-{server.ports['admin'] + 10000}.sock")
        server.stop(graceful=False)  # the harshest stop: nothing may be lost
    # weed's hard-coded /tmp socket (made by its admin worker at some point after start) is cleaned up
    assert not admin_sock.exists()
    mtime = cred_file.stat().st_mtime_ns
    again = SeaweedS3(state)
    second = again.start(timeout=30)
    try:
        assert (second.access_key_id, second.secret_access_key) == (first.access_key_id, first.secret_access_key)
        assert cred_file.stat().st_mtime_ns == mtime  # not rewritten
        assert second.client().get_object(Bucket="keep-me", Key="k")["Body"].read() == b"survives a SIGKILL"
    finally:
        again.stop(graceful=False)
    # a different state dir gets different keys
    other_access, other_secret, _ = load_credentials(tmp_path / "other")
    assert (other_access, other_secret) != (first.access_key_id, first.secret_access_key)


def test_ensure_running_starts_detached_once_and_reuses_it(tmp_path: Path) -> None:
    state = tmp_path / "home" / "s3"
    try:
        settings = ensure_running(state)
        pid = int(json.loads((state / STATE_FILE).read_text())["pid"])
        assert os.getsid(pid) != os.getsid(0)  # own session: survives the caller (make demo → make ui)
        again = ensure_running(state)
        assert again == settings
        assert int(json.loads((state / STATE_FILE).read_text())["pid"]) == pid  # reused, not restarted
        ensure_bucket(settings, "demo-bucket")
        settings.client().put_object(Bucket="demo-bucket", Key="a", Body=b"1")
    finally:
        stopped = stop_running(state)
    assert stopped is True
    assert not (state / STATE_FILE).exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert stop_running(state) is False  # idempotent


def test_security_material_generated_once_private_and_a_partial_set_regenerated(tmp_path: Path) -> None:
    from spatial_assets.storage.seaweed_security import ensure_security

    first = ensure_security(tmp_path / "state")
    files = (first.config, first.ca_cert, first.cert, first.key)
    snapshot = {f: f.read_bytes() for f in files}
    assert stat.S_IMODE(first.config_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert ensure_security(tmp_path / "state") == first
    assert {f: f.read_bytes() for f in files} == snapshot  # reused, not rewritten
    first.cert.unlink()  # e.g. a crash mid-generation: the whole set is made again, consistently
    again = ensure_security(tmp_path / "state")
    assert again.ca_cert.read_bytes() != snapshot[first.ca_cert] and again.config.read_bytes() != snapshot[first.config]
    other = ensure_security(tmp_path / "other")
    assert other.config.read_text() != again.config.read_text()  # keys differ per state dir


class _UnsecuredSeaweed(SeaweedS3):
    """A server as started before its ports were secured (no ``-config_dir``)."""

    def command(self) -> list[str]:
        cmd = super().command()
        return [c for c in cmd if not c.startswith("-config_dir=")]


def test_ensure_running_replaces_a_server_started_without_security(tmp_path: Path) -> None:
    state = (tmp_path / "home" / "s3").resolve()
    old = _UnsecuredSeaweed(state, detach=True)
    settings = old.start(timeout=30)
    old_pid = old.pid
    (state / STATE_FILE).write_text(
        json.dumps({"pid": old_pid, "ports": old.ports, "endpoint_url": settings.endpoint_url, "region": "us-east-1"})
    )
    old.proc = None  # detached, as ensure_running leaves it
    try:
        new_settings = ensure_running(state)
        new_pid = int(json.loads((state / STATE_FILE).read_text())["pid"])
        assert new_pid != old_pid
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        assert f"-config_dir={state / 'security'}" in psutil.Process(new_pid).cmdline()
        assert (new_settings.access_key_id, new_settings.secret_access_key) == (settings.access_key_id, settings.secret_access_key)
    finally:
        stop_running(state)
        with contextlib.suppress(ProcessLookupError):
            os.kill(old_pid, 9)
