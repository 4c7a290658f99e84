"""Peak memory of reading a large reference down to a panel: chunked subset vs full load.

Builds (seeded, chunk-wise, never holding the whole matrix) a raw-count h5ad of ``--cells`` ×
``--genes`` with about ``--nnz-per-cell`` non-zeros per cell, then measures in SEPARATE
subprocesses, each reporting its own peak RSS (``VmHWM``; ``ru_maxrss`` would include the RSS
the parent had when it forked the child):

  (0) baseline: imports only
  (a) ``spatial_assets.celltyping.references.read_reference_subset`` to a ``--panel``-gene panel
  (b) ``anndata.read_h5ad`` of the whole file, then ``[:, panel].copy()``

and prints both peaks (GB), their ratio and PASS/FAIL of (a) against the 3 GB target.

Usage: .venv/bin/python benchmarks/bench_reference_memory.py [--cells 200000 --genes 30000 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from anndata.io import write_elem

TARGET_GB = 3.0
ROOT = Path(__file__).resolve().parents[1]


def build_reference(path: Path, n_cells: int, n_genes: int, nnz_per_cell: int, seed: int, rows_per_chunk: int = 10_000) -> int:
    """Write a CSR raw-count h5ad chunk by chunk (resizable h5py datasets); returns nnz."""
    rng = np.random.default_rng(seed)
    genes = [f"Gene{j:05d}" for j in range(n_genes)]
    types = np.array([f"type_{t:02d}" for t in range(20)])
    labels = types[np.minimum((rng.pareto(1.2, n_cells) * 3).astype(int), types.size - 1)]
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"cell{i:07d}" for i in range(n_cells)])
    var = pd.DataFrame(index=genes)
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for empty in ("uns", "obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, empty, {})
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([n_cells, n_genes])
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        total = 0
        for start in range(0, n_cells, rows_per_chunk):
            rows = min(rows_per_chunk, n_cells - start)
            per_cell = rng.integers(nnz_per_cell // 2, 3 * nnz_per_cell // 2 + 1, size=rows)
            row_of = np.repeat(np.arange(rows, dtype=np.int64), per_cell)
            # skewed gene usage (a few genes in every cell, a long tail), like real UMI data
            col = (n_genes * rng.random(row_of.size) ** 2).astype(np.int64)
            key = row_of * n_genes + col
            key.sort()  # np.unique is ~50x slower here (numpy 2.4); sort + mask does the same
            first = np.empty(key.size, dtype=bool)
            first[0] = True
            np.not_equal(key[1:], key[:-1], out=first[1:])
            key = key[first]
            r, c = key // n_genes, key % n_genes
            vals = rng.geometric(0.45, size=key.size).astype(np.float32)
            n = key.size
            data.resize((total + n,))
            indices.resize((total + n,))
            data[total : total + n] = vals
            indices[total : total + n] = c.astype(np.int32)
            indptr[start + 1 : start + rows + 1] = total + np.cumsum(np.bincount(r, minlength=rows))
            total += n
        g.create_dataset("indptr", data=indptr)
    return total


CHILD = r"""
import json, sys, time
import numpy as np
mode, path, panel_file = sys.argv[1], sys.argv[2], sys.argv[3]
panel = [l.strip() for l in open(panel_file) if l.strip()]
import anndata as ad
import scipy.sparse as sp
from spatial_assets.celltyping.references import read_reference_subset
t0 = time.perf_counter()
if mode == "baseline":
    X = sp.csr_matrix((1, 1), dtype=np.float32)
elif mode == "subset":
    X = read_reference_subset(path, panel, label_column="cell_type").X
else:
    a = ad.read_h5ad(path)
    X = a[:, panel].X.copy()
    del a
X = sp.csr_matrix(X)
secs = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss across exec
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"mode": mode, "peak_gb": peak_kb * 1024 / 1e9, "seconds": secs, "shape": list(X.shape),
                  "nnz": int(X.nnz), "sum": float(X.sum(dtype=np.float64))}))
"""


def run_child(mode: str, path: Path, panel_file: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(path), str(panel_file)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if res.returncode != 0:
        raise RuntimeError(f"{mode} child failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=30_000)
    p.add_argument("--nnz-per-cell", type=int, default=1_000)
    p.add_argument("--panel", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where to build the file (default: a temp dir, removed after)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "reference.h5ad"
        t0 = time.perf_counter()
        nnz = build_reference(path, args.cells, args.genes, args.nnz_per_cell, args.seed)
        build_s = time.perf_counter() - t0
        size_gb = path.stat().st_size / 1e9
        print(f"built {args.cells:,} cells x {args.genes:,} genes, nnz {nnz:,} ({nnz / args.cells:.0f}/cell), "
              f"file {size_gb:.2f} GB in {build_s:.1f} s")
        rng = np.random.default_rng(args.seed + 1)
        panel = [f"Gene{j:05d}" for j in sorted(rng.choice(args.genes, args.panel, replace=False))]
        panel_file = Path(tmp) / "panel.txt"
        panel_file.write_text("\n".join(panel))

        base = run_child("baseline", path, panel_file)
        sub = run_child("subset", path, panel_file)
        full = run_child("full", path, panel_file)

    same = sub["shape"] == full["shape"] and sub["nnz"] == full["nnz"] and sub["sum"] == full["sum"]
    print(f"(0) baseline (imports only)        peak RSS {base['peak_gb']:.2f} GB")
    print(f"(a) read_reference_subset ({args.panel} genes) peak RSS {sub['peak_gb']:.2f} GB  in {sub['seconds']:.1f} s  "
          f"-> {sub['shape'][0]:,} x {sub['shape'][1]}, nnz {sub['nnz']:,}")
    print(f"(b) read_h5ad full + subset        peak RSS {full['peak_gb']:.2f} GB  in {full['seconds']:.1f} s")
    print(f"ratio full / chunked peak: {full['peak_gb'] / sub['peak_gb']:.2f}x; "
          f"above baseline: {(full['peak_gb'] - base['peak_gb']) / max(sub['peak_gb'] - base['peak_gb'], 1e-9):.1f}x")
    print(f"results identical (shape, nnz, sum): {same}")
    ok = sub["peak_gb"] < TARGET_GB and same
    print(f"{'PASS' if ok else 'FAIL'}: chunked subset peak {sub['peak_gb']:.2f} GB vs target < {TARGET_GB:.0f} GB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
