"""Storage layer figures: local SeaweedFS start/stop, and an h5ad round trip through both IO managers.

Prints seconds for write (+ sha256 + store), cold load and warm load (ETag cache hit) of a
100,000 x 500 sparse AnnData through the local-filesystem and the S3 IO manager, and their ratios
(S3 against local in the same run).
"""
import os, shutil, tempfile, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path
import numpy as np, scipy.sparse as sp, anndata as ad, pandas as pd
import dagster as dg
from spatial_assets.storage.seaweed import SeaweedS3, ensure_bucket
from spatial_assets.defs.io_managers import LocalObjectStoreIOManager, S3ObjectStoreIOManager

root = Path(tempfile.mkdtemp(prefix="h4b-"))
starts, stops_term = [], []
for i in range(3):
    s = SeaweedS3(root / f"st{i}")
    t = time.perf_counter(); st = s.start(); starts.append(time.perf_counter() - t)
    t = time.perf_counter(); s.stop(graceful=True); stops_term.append(time.perf_counter() - t)
print(f"seaweed start->first signed request: {[round(x,2) for x in starts]} s")
print(f"seaweed SIGTERM stop: {[round(x,2) for x in stops_term]} s")

srv = SeaweedS3(root / "main"); st = srv.start()
ensure_bucket(st, "bench")
rng = np.random.default_rng(0)
n, g, nnz_per = 100_000, 500, 120
indptr = np.arange(0, n * nnz_per + 1, nnz_per)
indices = np.sort(rng.integers(0, g, size=(n, nnz_per)), axis=1).ravel()
X = sp.csr_matrix((rng.integers(1, 30, size=n * nnz_per).astype(np.float32), indices, indptr), shape=(n, g))
X.sum_duplicates()
a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
key = dg.AssetKey(["bench_cells"])
ios = {
    "local": LocalObjectStoreIOManager(root=str(root / "local"), prefix="assets"),
    "s3": S3ObjectStoreIOManager(bucket="bench", prefix="assets", endpoint_url=st.endpoint_url,
                                 aws_access_key_id=st.access_key_id, aws_secret_access_key=st.secret_access_key,
                                 region_name="us-east-1", cache_dir=str(root / "cache")),
}
res = {}
for name, io in ios.items():
    io.get_store()
    out = dg.build_output_context(asset_key=key)
    t = time.perf_counter(); io.handle_output(out, a); w = time.perf_counter() - t
    meta = out.get_logged_metadata()
    inp = dg.build_input_context(asset_key=key, definition_metadata={"format": "h5ad"})
    t = time.perf_counter(); b = io.load_input(inp); r1 = time.perf_counter() - t
    t = time.perf_counter(); b = io.load_input(inp); r2 = time.perf_counter() - t
    assert b.shape == a.shape and (b.X != a.X).nnz == 0
    res[name] = (w, r1, r2)
    print(f"{name:5s}: {meta['size_bytes'].value/1e6:.0f} MB h5ad ({a.n_obs}x{a.n_vars}, nnz {a.X.nnz}); write+sha256+store {w:.2f} s; load cold {r1:.2f} s; load warm (ETag cache) {r2:.2f} s")
print(f"ratio s3/local: write {res['s3'][0]/res['local'][0]:.2f}x, cold load {res['s3'][1]/res['local'][1]:.2f}x, warm load {res['s3'][2]/res['local'][2]:.2f}x")
srv.stop(graceful=False)
shutil.rmtree(root, ignore_errors=True)
