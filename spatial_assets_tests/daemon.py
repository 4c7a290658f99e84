"""Run the real ``dagster-daemon`` for a test: a subprocess in its own session, always torn down.

The daemon starts its own code server (which spawns run workers, which spawn step processes): all
of them are found through psutil and stopped at the end, so no test leaves a Dagster process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
DAEMON = Path(sys.executable).parent / "dagster-daemon"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def write_workspace(path: Path, module: str, location_name: str) -> Path:
    path.write_text(
        "load_from:\n"
        f"  - python_module:\n      module_name: {module}\n      working_directory: {REPO}\n      location_name: {location_name}\n"
    )
    return path


def daemon_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "SPATIAL_ASSETS_", "PYTEST_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **extra)
    return env


@contextlib.contextmanager
def running_daemon(home: Path, workspace: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(DAEMON), "run", "-w", str(workspace)],
            cwd=home, env={**env, "DAGSTER_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
    try:
        yield proc
    finally:
        stop_tree(proc.pid)


def stop_tree(pid: int, timeout: float = 30) -> None:
    """SIGTERM the process and every descendant, SIGKILL what is left after ``timeout``."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, *, log: Path | None = None, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n--- daemon log tail ---\n{tail}")
        time.sleep(interval)
