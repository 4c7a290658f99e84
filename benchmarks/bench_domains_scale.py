"""Domain engine scaling, 10k → 300k cells: wall time, peak RSS, slope, and the ratio to the old code.

Workload (as bench_domains_synthetic.py): synthetic tissue, 300 genes, 8 domains, 2 samples, raw counts;
``run_domains`` with the default engine, levels 4/8/12, end to end (normalise + graph + fit + assign).
Tissue generation is not timed. Each size runs in a fresh process so peak RSS is that size's own.

``--baseline-ref REF`` (default: the commit before issue 9's domain work) also runs the *same* workload
with the code of that git commit, extracted to a temporary directory, in the same run, and prints
new/old ratios — on a shared machine the ratio is the figure to trust, not the absolute seconds.
Also prints, at the largest size, the gene Gram product both ways (sparse ``m.T @ m`` vs dense row
blocks) on the same matrices.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_domains_scale.py [--sizes 10000,30000,100000,300000]
       [--baseline-ref c861ee5 | --no-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "c861ee5"  # layout commit: the engine as it was before issue 9


def child(n_cells: int, gram: bool) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import psutil
    from sklearn.metrics import adjusted_rand_score

    from spatial_assets.domains.engine import run_domains
    from spatial_assets.domains.synthetic import make_synthetic_tissue, split_samples

    tissue = make_synthetic_tissue(n_cells, n_domains=8, n_samples=2, composition_concentration=0.5, seed=0)
    samples = split_samples(tissue)
    del tissue
    rss0 = psutil.Process().memory_info().rss
    t = time.perf_counter()
    outs, _ = run_domains(samples, n_domains=8, levels=[4, 12], seed=0)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "n_cells": n_cells,
        "seconds": wall,
        "peak_rss_gib": peak / 1024**3,
        "rss_before_gib": rss0 / 1024**3,
        "ari": float(np.mean([adjusted_rand_score(o.obs["true_domain"], o.obs["domain"]) for o in outs])),
    }
    if gram:
        import scipy.sparse as sp

        from spatial_assets.core.normalization import log_normalized
        from spatial_assets.domains.neighborhood import gram_matrix

        mats = [sp.csr_matrix(log_normalized(s)[0], dtype=np.float64) for s in samples]
        t = time.perf_counter()
        slow = sum((m.T @ m).toarray() for m in mats)
        out["gram_sparse_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        fast = gram_matrix(mats)
        out["gram_dense_blocks_seconds"] = time.perf_counter() - t
        out["gram_max_abs_diff"] = float(np.abs(slow - fast).max())
    return out


def _run(code_root: Path, n: int, gram: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n)] + (["--gram"] if gram else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code_root)
    if proc.returncode != 0:
        raise RuntimeError(f"child {n} under {code_root} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _extract(ref: str, dest: Path) -> Path:
    archive = dest / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref, "spatial_assets"], check=True)
    with tarfile.open(archive) as tf:
        tf.extractall(dest, filter="data")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,30000,100000,300000")
    ap.add_argument("--baseline-ref", default=DEFAULT_BASELINE)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gram", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.gram)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"domains scale: synthetic 300 genes, 8 domains, 2 samples; levels 4/8/12; OMP_NUM_THREADS=1; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine: trust the ratios)")
    with tempfile.TemporaryDirectory() as tmp:
        old_root = None if args.no_baseline else _extract(args.baseline_ref, Path(tmp))
        rows = []
        for n in sizes:
            new = _run(ROOT, n, gram=n == max(sizes))
            old = _run(old_root, n, gram=False) if old_root else None
            rows.append((n, new, old))
            line = (f"{n:>8} cells: {new['seconds']:6.1f} s  peak RSS {new['peak_rss_gib']:.2f} GiB  ARI {new['ari']:.3f}")
            if old:
                line += (f" | old ({args.baseline_ref}) {old['seconds']:6.1f} s  {old['peak_rss_gib']:.2f} GiB  ARI {old['ari']:.3f}"
                         f" | new/old time {new['seconds'] / old['seconds']:.2f}")
            print(line, flush=True)
        for (n1, a, oa), (n2, b, ob) in zip(rows, rows[1:]):
            import math

            slope = math.log(b["seconds"] / a["seconds"]) / math.log(n2 / n1)
            text = f"slope {n1}->{n2}: {slope:.2f}"
            if oa and ob:
                text += f" (old {math.log(ob['seconds'] / oa['seconds']) / math.log(n2 / n1):.2f})"
            print(text)
        last = rows[-1][1]
        if "gram_sparse_seconds" in last:
            print(f"gene Gram product at {rows[-1][0]} cells: sparse m.T@m {last['gram_sparse_seconds']:.2f} s, "
                  f"dense row blocks {last['gram_dense_blocks_seconds']:.2f} s "
                  f"({last['gram_sparse_seconds'] / max(last['gram_dense_blocks_seconds'], 1e-9):.1f}x), max |diff| {last['gram_max_abs_diff']:.1e}")
        n, new, old = rows[-1]
        if n == 300_000:
            verdict = "MET" if new["seconds"] <= 20 else "NOT MET on this (shared) machine"
            print(f"target 300k cells <= 20 s on 2 cores: {new['seconds']:.1f} s -> {verdict}"
                  + (f"; old code {old['seconds']:.1f} s in the same run (ratio {new['seconds'] / old['seconds']:.2f})" if old else ""))


if __name__ == "__main__":
    main()
