"""Annotation throughput and memory on a 500-gene panel (15 classes), two query sizes.

Each size runs in its own subprocess so peak RSS (resource.getrusage) belongs to that query alone;
the printed "query matrix" is the size of the query's own CSR arrays, to compare RSS growth with.
Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_annotation_throughput.py [n1 n2 ...]
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import resource, time, sys
import numpy as np, pandas as pd, scipy.sparse as sp
from anndata import AnnData
from spatial_assets.training import train_model
from spatial_assets.annotation import annotate
n, g, k = int(sys.argv[1]), 500, 15
rng = np.random.default_rng(0)
mu = rng.gamma(1.0, 1.0, size=(k, g)); mu[np.arange(k)[:, None], rng.integers(0, g, size=(k, 20))] += 5
def counts(m, depth, seed):
    r = np.random.default_rng(seed); parts = []; lab = r.integers(0, k, size=m)
    for s in range(0, m, 50_000):
        l = lab[s:s + 50_000]; lam = mu[l] * depth / mu[l].sum(1, keepdims=True)
        parts.append(sp.csr_matrix(r.poisson(lam).astype(np.float32)))
    return sp.vstack(parts, format="csr"), lab
Xr, yr = counts(6000, 1000, 1)
Xr.data = Xr.data  # log-normalise the reference
s = np.asarray(Xr.sum(1)).ravel(); Xr = sp.csr_matrix(sp.diags(1e4 / np.maximum(s, 1)) @ Xr); Xr.data = np.log1p(Xr.data)
genes = [f"G{i}" for i in range(g)]
ref = AnnData(X=Xr.astype(np.float32), obs=pd.DataFrame({"cell_type": [f"t{i}" for i in yr]}, index=[f"r{i}" for i in range(len(yr))]), var=pd.DataFrame(index=genes))
model = train_model(ref)
Xq, yq = counts(n, 150, 2)
q = AnnData(X=Xq, obs=pd.DataFrame(index=[f"q{i}" for i in range(n)]), var=pd.DataFrame(index=genes))
del Xq
query_mb = (q.X.data.nbytes + q.X.indices.nbytes + q.X.indptr.nbytes) / 1e6
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
out = annotate(q, model, batch_size=50_000)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
acc = (out.obs["cell_type_predicted"].astype(str).to_numpy() == np.array([f"t{i}" for i in yq])).mean()
print(f"n={n:>9,d}  {n / dt:>10,.0f} cells/s  ({dt:.2f} s)  peak RSS {peak:7.0f} MB (before annotate {base:7.0f} MB, "
      f"growth {peak - base:6.0f} MB)  query matrix {query_mb:6.0f} MB  acc {acc:.3f}  alignment {out.uns['celltyping']['alignment']}")
"""


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [200_000, 1_000_000]
    for n in sizes:
        subprocess.run([sys.executable, "-c", CHILD, str(n)], check=True)
    print("target: >= 100,000 cells/s; RSS growth ~ the query's own size (one dense batch: 50k x 500 float32 = 100 MB)")


if __name__ == "__main__":
    main()
