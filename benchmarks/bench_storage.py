"""Storage throughput: an h5ad through the local and the S3 IO manager in the same run, and their ratio.

Prints, for a ~120 MB sparse AnnData (100,000 x 500) written and read through the IO managers
(``AssetIOManager`` = Dagster's UPathIOManager with this project's formats):

* local directory (the baseline) — write (serialise + sha256 + publish), cold read, warm read;
* S3 on the bundled SeaweedFS with the shipped transfer settings (parallel multipart parts);
* S3 with the same code but one part at a time (``transfer_concurrency=1``): the control that shows
  the parallel parts, not the machine's mood, are what makes the difference;

each the median of ``--repeats`` runs, as MB/s and as S3 throughput / local throughput (the issue's
target: >= 0.5 for write and cold read). "Cold" = an empty download cache; "warm" = ETag cache hit.
It also prints the CPU seconds the SeaweedFS process spent, since on a 2-core machine the server
competes with the client for the same cores.

``--sweep`` adds the raw transfer measurements behind the shipped settings: boto3's transfer
manager over part sizes x concurrency, s3fs's ``put_file``/``get_file``, and parts sent with and
without a media type (SeaweedFS gzips untyped chunks).

Timings on a shared machine are contended: compare the ratios, which are measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import io as _io
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path

import anndata as ad
import dagster as dg
import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp
from dagster_aws.s3 import S3Resource

from spatial_assets.defs.io_managers import LocalAssetIOManager, S3AssetIOManager
from spatial_assets.storage.objectstore import transfer_config, with_content_types
from spatial_assets.storage.seaweed import SeaweedS3, ensure_bucket

MB = 1e6


def make_cells(seed: int = 0, n: int = 100_000, g: int = 500, nnz_per: int = 160) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    indptr = np.arange(0, n * nnz_per + 1, nnz_per)
    indices = np.sort(rng.integers(0, g, size=(n, nnz_per)), axis=1).ravel()
    X = sp.csr_matrix((rng.integers(1, 30, size=n * nnz_per).astype(np.float32), indices, indptr), shape=(n, g))
    X.sum_duplicates()
    return ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))


def time_io(factory, cells: ad.AnnData, cache_root: Path | None, repeats: int, weed: psutil.Process | None) -> dict:
    key = dg.AssetKey(["bench_cells"])
    writes, colds, warms, weed_cpu, size = [], [], [], [], 0
    me = psutil.Process()
    cpu = {"write": [], "cold": []}  # CPU seconds (this process + the server) per operation
    for r in range(repeats):
        if cache_root is not None:
            factory = factory.model_copy(update={"cache_dir": str(cache_root / f"cache{r}")})  # empty cache: cold read
        io = factory.create_io_manager(None)
        io.store.exists("warm-up")  # the client and its connections exist before the clock starts
        cpu0 = sum(weed.cpu_times()[:2]) if weed else 0.0
        out = dg.build_output_context(asset_key=key)
        inp = dg.build_input_context(asset_key=key, definition_metadata={"format": "h5ad"})
        def used() -> float:
            return sum(me.cpu_times()[:2]) + (sum(weed.cpu_times()[:2]) if weed else 0.0)

        with contextlib.redirect_stderr(_io.StringIO()):  # the contexts' debug log lines are not figures
            c, t = used(), time.perf_counter()
            io.handle_output(out, cells)
            writes.append(time.perf_counter() - t)
            cpu["write"].append(used() - c)
            c, t = used(), time.perf_counter()
            back = io.load_input(inp)
            colds.append(time.perf_counter() - t)
            cpu["cold"].append(used() - c)
            t = time.perf_counter()
            io.load_input(inp)
            warms.append(time.perf_counter() - t)
        size = out.get_logged_metadata()["size_bytes"].value
        weed_cpu.append(sum(weed.cpu_times()[:2]) - cpu0 if weed else 0.0)
        assert back.shape == cells.shape and (back.X != cells.X).nnz == 0
    med = statistics.median
    return {"size": size, "write": med(writes), "cold": med(colds), "warm": med(warms), "weed_cpu": med(weed_cpu),
            "all_write": writes, "all_cold": colds, "cpu_write": med(cpu["write"]), "cpu_cold": med(cpu["cold"])}


def sweep(st, root: Path, weed: psutil.Process) -> None:
    import boto3
    from botocore.config import Config

    src = root / "blob.h5ad"
    src.write_bytes(np.random.default_rng(1).integers(0, 30, size=30_000_000).astype(np.float32).tobytes())  # 120 MB, compressible
    size = src.stat().st_size

    def client(typed: bool = True):
        c = boto3.client("s3", endpoint_url=st.endpoint_url, aws_access_key_id=st.access_key_id, aws_secret_access_key=st.secret_access_key,
                         region_name=st.region_name, config=Config(s3={"addressing_style": "path"}, max_pool_connections=20,
                                                                 request_checksum_calculation="when_required",
                                                                 response_checksum_validation="when_required"))
        return with_content_types(c) if typed else c

    def best(fn, n: int = 2) -> tuple[float, float]:
        out = []
        for _ in range(n):
            cpu0 = sum(weed.cpu_times()[:2])
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t, sum(weed.cpu_times()[:2]) - cpu0))
        return min(out)

    dst = root / "dl.bin"
    t, _ = best(lambda: shutil.copyfile(src, dst))
    print(f"  local file copy (reference)                       {size / t / MB:7.0f} MB/s")
    for typed in (False, True):
        c = client(typed)
        label = "typed parts" if typed else "untyped parts"
        for part_mb, conc in ((8, 1), (8, 4), (8, 8), (16, 8), (32, 4)):
            cfg = transfer_config(part_size=part_mb * 2**20, concurrency=conc)
            tu, cu = best(lambda: c.upload_file(str(src), "bench", "sweep.h5ad", Config=cfg, ExtraArgs={"ContentType": "application/x-hdf5"}))
            td, cd = best(lambda: c.download_file("bench", "sweep.h5ad", str(dst), Config=cfg))
            print(f"  boto3 {label:13s} part {part_mb:2d} MiB x{conc}: put {size / tu / MB:5.0f} MB/s (weed cpu {cu:4.2f} s)"
                  f"  get {size / td / MB:5.0f} MB/s (weed cpu {cd:4.2f} s)")
    import s3fs

    fs = s3fs.S3FileSystem(key=st.access_key_id, secret=st.secret_access_key, endpoint_url=st.endpoint_url,
                           client_kwargs={"region_name": st.region_name})
    for part_mb, conc in ((8, 8), (32, 4)):
        tu, cu = best(lambda: fs.put_file(str(src), "bench/sweep-s3fs.h5ad", chunksize=part_mb * 2**20, max_concurrency=conc))
        td, cd = best(lambda: fs.get_file("bench/sweep-s3fs.h5ad", str(dst)))
        print(f"  s3fs put_file/get_file part {part_mb:2d} MiB x{conc}:     put {size / tu / MB:5.0f} MB/s (weed cpu {cu:4.2f} s)"
              f"  get {size / td / MB:5.0f} MB/s (weed cpu {cd:4.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="also print the raw transfer sweep behind the settings")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    srv = SeaweedS3(root / "s3")
    try:
        t = time.perf_counter()
        st = srv.start()
        print(f"seaweed start -> first signed request: {time.perf_counter() - t:.2f} s")
        ensure_bucket(st, "bench")
        weed = psutil.Process(srv.pid)
        s3 = S3Resource(endpoint_url=st.endpoint_url, aws_access_key_id=st.access_key_id,
                        aws_secret_access_key=st.secret_access_key, region_name=st.region_name)
        cells = make_cells()
        print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        runs = {
            "local": time_io(LocalAssetIOManager(base_dir=str(root / "local")), cells, None, args.repeats, None),
            "s3 parallel": time_io(S3AssetIOManager(s3_resource=s3, s3_bucket="bench", s3_prefix="par"), cells, root, args.repeats, weed),
            "s3 serial": time_io(S3AssetIOManager(s3_resource=s3, s3_bucket="bench", s3_prefix="ser", transfer_concurrency=1),
                                 cells, root, args.repeats, weed),
        }
        size = runs["local"]["size"]
        print(f"h5ad: {size / MB:.0f} MB ({cells.n_obs} x {cells.n_vars}, nnz {cells.X.nnz}); median of {args.repeats}")
        for name, r in runs.items():
            cpu = f"  (weed cpu {r['weed_cpu']:.2f} s)" if name != "local" else ""
            print(f"  {name:12s} write {r['write']:5.2f} s = {size / r['write'] / MB:5.0f} MB/s   cold read {r['cold']:5.2f} s = "
                  f"{size / r['cold'] / MB:5.0f} MB/s   warm read {r['warm']:5.2f} s{cpu}")
            print(f"  {'':12s} all write {[round(x, 2) for x in r['all_write']]}  all cold {[round(x, 2) for x in r['all_cold']]}"
                  f"  CPU s (client+server): write {r['cpu_write']:.2f}, cold read {r['cpu_cold']:.2f}")
        loc = runs["local"]
        for name in ("s3 parallel", "s3 serial"):
            r = runs[name]
            print(f"throughput {name} / local: write {loc['write'] / r['write']:.2f}, cold read {loc['cold'] / r['cold']:.2f}, "
                  f"warm read {loc['warm'] / r['warm']:.2f}  (target >= 0.50 for write and cold read)")
        par, ser = runs["s3 parallel"], runs["s3 serial"]
        print(f"parallel parts vs one at a time: write {ser['write'] / par['write']:.2f}x faster, cold read {ser['cold'] / par['cold']:.2f}x faster")
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
        if args.sweep:
            print("raw transfer sweep (120 MB object; best of 2):")
            sweep(st, root, weed)
    finally:
        srv.stop(graceful=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
