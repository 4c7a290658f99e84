"""A writer process for the kill tests: starts a real write through the stores, then parks in it.

Run as ``python -m spatial_assets_tests.reliability.killable_writer MODE ...``; it writes its pid to
the marker file at the point where the test should SIGKILL it:

* ``s3-upload``: a multipart upload (40 MiB > the 16 MiB threshold) via ``S3Store.staged``; parks in
  the second UploadPart, after part 1 reached the server;
* ``s3-download``: ``S3Store.get_file`` of an existing object; parks in GetObject, after the cache's
  temp file was created;
* ``local-staged``: ``LocalStore.staged``; parks after writing half the file into the stage dir.

The parking happens in test code (a botocore event hook / this script), never in product code.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from spatial_assets.storage.objectstore import S3Settings
from spatial_assets.storage.stores import LocalStore, S3Store

MiB = 1024 * 1024


def _park(marker: Path) -> None:
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, marker)  # atomic: the test never reads a created-but-empty marker
    time.sleep(3600)


def main(mode: str, marker_path: str, *args: str) -> None:
    marker = Path(marker_path)
    if mode == "s3-upload":
        bucket, prefix, key, cache = args
        store = S3Store(bucket, prefix, S3Settings.from_env(), cache_dir=cache)

        first_part_stored = threading.Event()

        def hold_later_parts(params, **_):
            if params.get("PartNumber", 1) >= 2:  # s3transfer sends parts from several threads at once
                first_part_stored.wait(60)
                _park(marker)

        def part_stored(http_response, **_):
            if http_response.status_code == 200:
                first_part_stored.set()

        store.client.meta.events.register("before-parameter-build.s3.UploadPart", hold_later_parts)
        store.client.meta.events.register("after-call.s3.UploadPart", part_stored)
        with store.staged(key) as path:
            with open(path, "wb") as fh:
                fh.write(os.urandom(40 * MiB))
    elif mode == "s3-download":
        bucket, prefix, key, cache = args
        store = S3Store(bucket, prefix, S3Settings.from_env(), cache_dir=cache)
        store.client.meta.events.register("before-call.s3.GetObject", lambda **_: _park(marker))
        store.get_file(key)
    elif mode == "local-staged":
        root, key = args
        with LocalStore(root).staged(key) as path:
            with open(path, "wb") as fh:
                fh.write(os.urandom(4 * MiB))
                fh.flush()
                _park(marker)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    raise SystemExit("the write finished: the test meant to kill it first")


if __name__ == "__main__":
    main(*sys.argv[1:])
