"""A real, throwaway PostgreSQL server for the tests (Debian's ``postgresql`` package, no Docker).

Why not a mock or sqlite: the production instance is Postgres (``deploy/dagster.postgres.yaml``);
its schema migrations, run-queue and concurrency-slot tables and the psycopg2 driver are only
exercised by a real server. ``initdb`` refuses to run as root, so when the tests run as root the
server runs as the ``postgres`` system user (the one the Debian package creates); otherwise as the
current user. It listens on a free loopback port only, with password (SCRAM) authentication, and
with durability off (``fsync=off``: a test database is disposable) so it starts in about a second.

When the binaries are missing the fixture *skips* with the command that installs them; ``make test``
runs that command itself when it is root (see the Makefile), so CI never passes silently without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "install the Debian package: `apt-get install -y postgresql` (make test does this when run as root)"


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL server binaries / user on this machine (the reason is the message)."""


def find_bindir() -> Path:
    """Directory holding ``initdb`` and ``postgres``: PG_BINDIR, Debian's /usr/lib/postgresql/<v>/bin, or PATH."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    candidates += reversed(debian)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "postgres").is_file():
            return c
    raise PostgresUnavailable(f"PostgreSQL server binaries (initdb, postgres) not found; {INSTALL_HINT}")


def _run_as() -> pwd.struct_passwd | None:
    """The account to run the server as: ``postgres`` when we are root (initdb refuses root), else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(f"running as root but there is no 'postgres' system user to run the server as; {INSTALL_HINT}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup(account: pwd.struct_passwd | None):
    """Between fork and exec: drop to ``account`` first, *then* ask for SIGQUIT on parent death.

    The order matters: Linux clears the parent-death signal when credentials change, so asking
    before the setuid (as ``Popen(user=...)`` would) leaves an orphan postmaster when pytest is killed.
    """

    def setup() -> None:  # pragma: no cover - runs in the child
        if account is not None:
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGQUIT)  # PR_SET_PDEATHSIG

    return setup


@dataclass
class PostgresServer:
    """One postmaster in a temp dir; ``start()`` / ``stop()``; ``create_database()`` for each test."""

    user: str = "dagster"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    host: str = "127.0.0.1"
    port: int = 0
    root: Path | None = None
    proc: subprocess.Popen | None = None
    startup_seconds: float = 0.0

    def _popen_kwargs(self, account: pwd.struct_passwd | None) -> dict:
        kw: dict = {"stdin": subprocess.DEVNULL, "preexec_fn": _child_setup(account)}
        if account is not None:
            kw["env"] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root), "LC_ALL": "C.UTF-8"}
        else:
            kw["env"] = {**os.environ, "LC_ALL": "C.UTF-8"}
        return kw

    def start(self, timeout: float = 60) -> PostgresServer:
        t0 = time.perf_counter()
        bindir = find_bindir()
        account = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="sa-pg-"))
        data, sock = self.root / "data", self.root / "sock"
        sock.mkdir()
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if account is not None:
            for p in (self.root, sock, pwfile):
                os.chown(p, account.pw_uid, account.pw_gid)
        os.chmod(pwfile, 0o600)
        kw = self._popen_kwargs(account)
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", self.user, f"--pwfile={pwfile}", "-E", "UTF8",
             "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "--no-sync", "--no-instructions"],
            capture_output=True, text=True, **kw,
        )
        pwfile.unlink()
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({init.returncode}): {init.stderr.strip()[-800:]}")
        self.port = _free_port()
        log = open(self.root / "postgres.log", "wb")
        try:
            self.proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(sock),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
                stdout=log, stderr=subprocess.STDOUT, **kw,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PostgresUnavailable(f"postgres exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self.connect("postgres").close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise PostgresUnavailable(f"postgres did not accept connections within {timeout:.0f} s: {self.log_tail()}")
                time.sleep(0.1)
        self.startup_seconds = time.perf_counter() - t0
        return self

    def log_tail(self, n: int = 5) -> str:
        try:
            return " | ".join((self.root / "postgres.log").read_text(errors="replace").strip().splitlines()[-n:])
        except (OSError, TypeError):
            return "no log"

    def connect(self, dbname: str):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=dbname, connect_timeout=5)

    def create_database(self, name: str | None = None) -> str:
        name = name or f"t_{secrets.token_hex(6)}"
        conn = self.connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name

    def env(self, dbname: str) -> dict[str, str]:
        """The variables ``deploy/dagster.postgres.yaml`` (and the Helm/ECS instances) read."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": dbname,
        }

    def stop(self) -> None:
        """Immediate shutdown (SIGQUIT: no checkpoint, the data is throwaway), SIGKILL after 20 s; the temp dir is removed."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
