"""Does ``target_sum="auto"`` pick the same library target when it scores on central windows?

Beyond ``_AUTO_SCORE_CELLS`` (50,000) cells the engine scores its two candidate library targets on a
set of tiles spread over each sample (about 50,000 cells in all) instead of on every cell, and normalises only
the winner in full. This prints, for every dataset of ``generality_domains.py`` and for synthetic tissue
of 100k / 300k cells, the choice and both scores with all cells and with tiles holding 1/4 of the
cells (and 50k cells for the large tissues), plus the time of the library-target step each way.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_auto_target_windows.py [--large 100000,300000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spatial_assets.domains.neighborhood as nb  # noqa: E402
from generality_domains import domain_tasks  # noqa: E402
from spatial_assets.domains.engine import fit_inputs, validate_spatial  # noqa: E402
from spatial_assets.domains.graph import _groups  # noqa: E402
from spatial_assets.domains.synthetic import make_synthetic_tissue, split_samples  # noqa: E402


def choose(samples, limit: int | None) -> tuple[float, dict, float]:
    adatas, _, names = fit_inputs(samples, [4], 4)
    params = nb.NeighborhoodParams()
    coords = [validate_spatial(a, n) for a, n in zip(adatas, names)]
    groups = [_groups(a, None) for a in adatas]
    common = set(adatas[0].var_names)
    for a in adatas[1:]:
        common &= set(a.var_names)
    genes = [g for g in adatas[0].var_names if g in common]
    model = nb.NeighborhoodDomainModel(params=params, genes=genes, levels=[4], n_domains=4, gene_mean=None,
                                       gene_scale=None, loadings1=None, mean2=None, loadings2=None, centroids={}, seed=0)
    graphs = [model._graph(xy, g) for xy, g in zip(coords, groups)]
    old = nb._AUTO_SCORE_CELLS
    nb._AUTO_SCORE_CELLS = limit if limit is not None else 10**12
    try:
        t = time.perf_counter()
        target, info, _ = nb._library_target(adatas, names, genes, params, graphs, groups, coords)
        return target, info, time.perf_counter() - t
    finally:
        nb._AUTO_SCORE_CELLS = old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", default="100000,300000")
    args = ap.parse_args()
    tasks = [(t.name, t.samples) for t in domain_tasks()]
    for n in [int(v) for v in args.large.split(",") if v]:
        tasks.append((f"synthetic_{n // 1000}k", split_samples(make_synthetic_tissue(n, n_domains=8, n_samples=2,
                                                                                      composition_concentration=0.5, seed=0))))
    same = total = 0
    print(f"{'dataset':26s} {'cells':>7s}  {'scored on':>9s}  {'target':>8s}  scores (median-library / 10,000)   seconds")
    for name, samples in tasks:
        n = sum(s.n_obs for s in samples)
        ref, info, secs = choose(samples, None)
        print(f"{name:26s} {n:7d}  {'all':>9s}  {ref:8.4g}  {info['structure_scores']}  {secs:6.2f}")
        for limit in sorted({n // 4, 50_000} if n > 200_000 else {n // 4}):
            tgt, inf, secs = choose(samples, limit)
            total += 1
            same += int(abs(tgt - ref) <= 1e-9 * ref)
            print(f"{'':26s} {'':7s}  {inf['scored_cells']:9d}  {tgt:8.4g}  {inf['structure_scores']}  {secs:6.2f}"
                  f"  {'same choice' if abs(tgt - ref) <= 1e-9 * ref else 'DIFFERENT choice'}")
    print(f"windowed scoring picked the all-cells choice in {same} of {total} cases")


if __name__ == "__main__":
    main()
