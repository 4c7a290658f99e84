"""Scale check: synthetic tissue, 100,000 cells, 8 domains, 2 samples, default domain engine.

End to end = normalisation + spatial graphs + fit (one model, both samples) + assignment, on raw
counts as a user would pass them. Prints wall time, peak RSS and ARI vs the true domains, and, for
scale, in the same run: the non-spatial baseline (cell alone) and an oracle ceiling (k-means on the
TRUE cell-type composition of the same neighbourhood — what a perfect cell typer would allow).
Target: default engine ≤ 5 min on 2 cores.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_domains_synthetic.py [--n-cells 100000]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from spatial_assets.domains.engine import DEFAULT_ENGINE, run_domains  # noqa: E402
from spatial_assets.domains.graph import _groups, spatial_graph_matrices  # noqa: E402
from spatial_assets.domains.neighborhood import _smoothing_operator  # noqa: E402
from spatial_assets.domains.synthetic import make_synthetic_tissue, split_samples  # noqa: E402


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-cells", type=int, default=100_000)
    ap.add_argument("--n-domains", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t = time.perf_counter()
    tissue = make_synthetic_tissue(args.n_cells, n_domains=args.n_domains, n_samples=2, composition_concentration=0.5, seed=args.seed)
    samples = split_samples(tissue)
    print(
        f"synthetic: {tissue.n_obs} cells x {tissue.n_vars} genes, {args.n_domains} domains, 2 samples, "
        f"nnz={tissue.X.nnz}; generated in {time.perf_counter() - t:.1f} s; threads OMP={os.environ.get('OMP_NUM_THREADS')}"
    )
    rss0 = psutil.Process().memory_info().rss / 1024**3
    t = time.perf_counter()
    outs, model = run_domains(samples, n_domains=args.n_domains, levels=[4, 12], method=DEFAULT_ENGINE, seed=args.seed)
    wall = time.perf_counter() - t
    aris = [adjusted_rand_score(o.obs["true_domain"], o.obs["domain"]) for o in outs]
    print(
        f"{DEFAULT_ENGINE} end-to-end (normalise+graph+fit+assign, levels 4/8/12): wall {wall:.1f} s "
        f"(target <= 300 s: {'OK' if wall <= 300 else 'MISSED'}); peak RSS {_peak_rss_gib():.2f} GiB "
        f"(RSS before the run {rss0:.2f} GiB)"
    )
    print(f"  ARI per sample {np.round(aris, 3).tolist()}  mean {np.mean(aris):.3f}")
    t = time.perf_counter()
    base, _ = run_domains(samples, n_domains=args.n_domains, seed=args.seed, lam=0.0, smooth_rounds=0, center_samples=False)
    b_aris = [adjusted_rand_score(o.obs["true_domain"], o.obs["domain"]) for o in base]
    print(f"baseline non-spatial PCA+kmeans: mean ARI {np.mean(b_aris):.3f} ({time.perf_counter() - t:.1f} s)")
    # oracle: true cell types averaged over the same neighbourhood (3 hops of the 10-NN graph)
    codes = tissue.obs["true_cell_type"].cat.codes.to_numpy()
    a = _smoothing_operator(spatial_graph_matrices(tissue.obsm["spatial"], _groups(tissue, "sample_id"))[0])
    h = np.eye(codes.max() + 1)[codes]
    acc = np.zeros_like(h)
    for _ in range(3):
        h = a @ h
        acc += h
    lab = KMeans(args.n_domains, n_init=10, random_state=args.seed).fit_predict(acc)
    oracle = adjusted_rand_score(tissue.obs["true_domain"], lab)
    print(f"oracle ceiling (true cell-type composition + kmeans): ARI {oracle:.3f}")
    print(f"ratio default/oracle {np.mean(aris) / oracle:.2f}; default/non-spatial {np.mean(aris) / max(np.mean(b_aris), 1e-9):.1f}x")


if __name__ == "__main__":
    main()
