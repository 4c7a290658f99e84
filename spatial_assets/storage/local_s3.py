"""Start, stop and inspect the bundled S3 server of a ``local_s3`` deployment (explicitly: no resource does).

``python -m spatial_assets.storage.local_s3 start|stop|status`` — the state dir, bucket and
credentials come from the deployment settings (:mod:`spatial_assets.storage.deployment`):
``$SPATIAL_ASSETS_HOME/s3`` holds ``server.json`` (pid, ports) and the generated credentials.
``make demo`` and ``make ui`` call :func:`start` / :func:`stop` around their work and stop only a
server they started themselves.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from spatial_assets.storage.deployment import StorageConfigError, StorageSettings
from spatial_assets.storage.objectstore import S3Settings


@dataclass(frozen=True)
class Started:
    settings: S3Settings
    started: bool  # False: a server was already running (leave it running when done)


def _state_dir(settings: StorageSettings):
    if settings.deployment != "local_s3" or settings.state_dir is None:
        raise StorageConfigError(f"deployment {settings.deployment!r} has no bundled S3 server (only 'local_s3' has)")
    return settings.state_dir


def start(settings: StorageSettings | None = None, timeout: float = 60) -> Started:
    """Reuse the running server or start a detached one; create the deployment's bucket."""
    from spatial_assets.storage.seaweed import ensure_bucket, ensure_running, recorded_pid

    settings = settings or StorageSettings.from_env()
    state_dir = _state_dir(settings)
    was_running = recorded_pid(state_dir) is not None
    s3 = ensure_running(state_dir, timeout=timeout)
    ensure_bucket(s3, settings.bucket)
    return Started(s3, started=not was_running)


def stop(settings: StorageSettings | None = None) -> bool:
    """Stop the server recorded in the state dir (SIGTERM, then SIGKILL); True if one was running."""
    from spatial_assets.storage.seaweed import stop_running

    return stop_running(_state_dir(settings or StorageSettings.from_env()))


def status(settings: StorageSettings | None = None) -> S3Settings | None:
    from spatial_assets.storage.seaweed import running_settings

    return running_settings(_state_dir(settings or StorageSettings.from_env()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spatial_assets.storage.local_s3", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    args = parser.parse_args(argv)
    settings = StorageSettings.from_env("local_s3")
    if args.command == "start":
        result = start(settings)
        verb = "started" if result.started else "already running"
        print(f"local S3 {verb}: {result.settings.endpoint_url} (bucket {settings.bucket}, state {settings.state_dir})")
        return 0
    if args.command == "stop":
        print("local S3 stopped" if stop(settings) else f"local S3 was not running (state {settings.state_dir})")
        return 0
    s3 = status(settings)
    print(f"local S3 running: {s3.endpoint_url} (state {settings.state_dir})" if s3 else f"local S3 not running (state {settings.state_dir})")
    return 0 if s3 else 1


if __name__ == "__main__":
    sys.exit(main())
