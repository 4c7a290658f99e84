"""Domain generality benchmark: every dataset with domain labels we have, ours vs the naive baseline.

Importable (``benchmarks/bench_generality.py`` prints its domains section from it) and runnable alone::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generality_domains.py            # table + acceptance
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generality_domains.py --sweep    # every alternative measured

Stable API: :func:`run_domain_tasks` returns one dict per dataset with keys
``dataset, description, n_obs, n_genes, n_samples, n_domains, ours, baseline, delta, passed,
ours_per_sample, baseline_per_sample, seconds_ours, seconds_baseline`` (ARI = mean over the dataset's
samples of the per-sample adjusted Rand index vs the truth; ``passed``: ours >= baseline - 0.02).

Datasets (all built by code in the repo, seeded; no network):

- ``starmap`` — STARmap mPFC, 3 slices, 166 genes, raw counts, 4 cortical layers (real labels).
- ``starmap_lowcount_30genes`` — the same tissue as a small low-count panel: 30 genes (seeded random
  choice) and every molecule kept with probability 0.3 (binomial thinning): real structure, real labels,
  the regime of 30-gene panels with libraries of tens to hundreds.
- ``starmap_pseudospots`` — the same cells summed into hexagonal pseudo-spots (~2.5 cell spacings
  apart), label = majority layer, shipped log1p-10k normalised without counts: real-data spots.
- ``synthetic_cells`` — ``make_synthetic_tissue`` (20,000 cells, 300 genes, 8 domains, 2 samples).
- ``synthetic_panel_lowcount`` — ``make_synthetic_tissue`` as a 30-gene low-count panel (libraries
  ~100), 11 domains.
- ``synthetic_spots_wt`` — ``make_synthetic_spots``: 4,096 spots on a hexagonal lattice, 3,000 genes,
  7 layers, already library-size normalised (log1p-10k, no counts).
- ``synthetic_spots_wt_raw`` — two 48 x 48 spot sections, 4,000 genes, 5 layers, raw counts.

POA MERFISH is *not* included: it has no region labels, and every Bregma-agnostic proxy we could build
is either circular (regions defined by neighbourhood cell-class composition are what the engines
cluster) or not a partition (distance to the third ventricle / midline is a continuous coordinate);
see docs/domains.md.

Naive baseline (the issue's definition, independent of the engine's code and defaults): log1p of
counts per 10,000 (core.normalization, as is when already so), top 2,000 genes by variance when there
are more, PCA (30 components, scanpy), each cell's PCs averaged with its 10 nearest spatial neighbours
(per sample), KMeans (10 restarts). Same seed, same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402

from spatial_assets.core.normalization import log_normalized  # noqa: E402
from spatial_assets.domains.engine import run_domains  # noqa: E402
from spatial_assets.domains.synthetic import make_synthetic_spots, make_synthetic_tissue, split_samples  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"
STARMAP = DATA / "mouse_mPFC_STARmap_Wang2018.h5ad"
TOLERANCE = 0.02  # acceptance: ours >= baseline - TOLERANCE on every dataset


@dataclass
class DomainTask:
    name: str
    description: str
    samples: list[ad.AnnData]
    truth: str
    n_domains: int


# ----------------------------------------------------------------------------------------- datasets


def _starmap_slices() -> list[ad.AnnData]:
    a = ad.read_h5ad(STARMAP)
    return [a[(a.obs["slice"] == s).to_numpy()].copy() for s in sorted(a.obs["slice"].unique())]


def _thin(a: ad.AnnData, keep: float, genes: list[str], seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    b = a[:, genes].copy()
    x = sp.csr_matrix(b.X, dtype=np.float32)
    x.data = rng.binomial(x.data.astype(np.int64), keep).astype(np.float32)
    x.eliminate_zeros()
    b.X = x
    return b


def _pseudospots(a: ad.AnnData, spacing_cells: float, seed: int) -> ad.AnnData:
    """Sum cells into hexagonal spots ``spacing_cells`` median cell spacings apart; majority layer."""
    from spatial_assets.domains.graph import median_nn_distance

    xy = np.asarray(a.obsm["spatial"], dtype=np.float64)[:, :2]
    spacing = spacing_cells * median_nn_distance(xy)
    lo = xy.min(0)
    n_cols = int(np.ceil((xy[:, 0].max() - lo[0]) / spacing)) + 2
    n_rows = int(np.ceil((xy[:, 1].max() - lo[1]) / (spacing * np.sqrt(3) / 2))) + 2
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    centres = np.column_stack([lo[0] + (c + 0.5 * (r % 2)) * spacing, lo[1] + r * spacing * np.sqrt(3) / 2])
    d, owner = NearestNeighbors(n_neighbors=1).fit(centres).kneighbors(xy)
    owner = owner[:, 0]
    inside = d[:, 0] <= 0.5 * spacing  # circular spots: cells between spots are not captured
    owner, cells = owner[inside], np.flatnonzero(inside)
    used, spot = np.unique(owner, return_inverse=True)
    agg = sp.csr_matrix((np.ones(cells.size), (spot, cells)), shape=(used.size, a.n_obs))
    counts = sp.csr_matrix(agg @ sp.csr_matrix(a.X, dtype=np.float64))
    keep = np.asarray(counts.sum(1)).ravel() > 0
    labels = pd.crosstab(spot, a.obs["layer"].astype(str).to_numpy()[cells]).idxmax(axis=1).to_numpy()
    sums = np.asarray(counts.sum(1)).ravel()
    norm = sp.csr_matrix(sp.diags(np.divide(1e4, sums, out=np.zeros_like(sums), where=sums > 0)) @ counts, dtype=np.float32)
    norm.data = np.log1p(norm.data)
    out = ad.AnnData(
        X=norm[keep],
        obs=pd.DataFrame({"layer": pd.Categorical(labels[keep]), "array_row": r[used][keep], "array_col": c[used][keep]},
                         index=[f"spot{i}" for i in np.flatnonzero(keep)]),
        var=pd.DataFrame(index=a.var_names.copy()),
    )
    out.obsm["spatial"] = centres[used][keep]
    return out


def domain_tasks(seed: int = 0) -> list[DomainTask]:
    """Every labelled domain dataset of the benchmark (see the module docstring), built now."""
    tasks: list[DomainTask] = []
    slices = _starmap_slices()
    tasks.append(DomainTask("starmap", "STARmap mPFC, 3 slices, 166 genes, raw counts, 4 layers", slices, "layer", 4))
    rng = np.random.default_rng(seed)
    genes = sorted(rng.choice(np.asarray(slices[0].var_names), 30, replace=False).tolist())
    thinned = [_thin(s, 0.3, genes, seed + i) for i, s in enumerate(slices)]
    tasks.append(DomainTask("starmap_lowcount_30genes", "STARmap, 30 genes, 30% of molecules (low-count panel)", thinned, "layer", 4))
    spots = [_pseudospots(s, 2.5, seed) for s in slices]
    tasks.append(DomainTask("starmap_pseudospots", "STARmap cells summed into hex spots, log1p-10k, no counts", spots, "layer", 4))
    syn = make_synthetic_tissue(20_000, n_domains=8, n_samples=2, composition_concentration=0.5, seed=seed)
    tasks.append(DomainTask("synthetic_cells", "synthetic cells, 20k, 300 genes, 8 domains, 2 samples", split_samples(syn), "true_domain", 8))
    panel = make_synthetic_tissue(
        8_000, n_domains=11, n_samples=2, n_genes=30, n_cell_types=10, mean_library_size=100.0,
        composition_concentration=0.5, seed=seed + 1,
    )
    tasks.append(DomainTask("synthetic_panel_lowcount", "synthetic 30-gene panel, libraries ~100, 11 domains", split_samples(panel), "true_domain", 11))
    wt = make_synthetic_spots(seed=seed + 2)
    tasks.append(DomainTask("synthetic_spots_wt", "synthetic hex spots, 3,000 genes, 7 layers, log1p-10k, no counts", [wt], "true_domain", 7))
    raw = [make_synthetic_spots(48, 48, n_domains=5, n_genes=4_000, normalized=False, seed=seed + 3, layout_seed=i) for i in range(2)]
    tasks.append(DomainTask("synthetic_spots_wt_raw", "synthetic hex spots, 4,000 genes, 5 layers, raw counts, 2 samples", raw, "true_domain", 5))
    return tasks


# ----------------------------------------------------------------------------------------- methods


def _ari(outs: list[ad.AnnData], truth: str, key: str = "domain") -> list[float]:
    return [float(adjusted_rand_score(o.obs[truth].astype(str), o.obs[key].astype(str))) for o in outs]


def naive_baseline(samples: list[ad.AnnData], n_domains: int, seed: int = 0) -> list[np.ndarray]:
    """Labels per sample: log1p-10k → top-2,000-variance genes → PCA(30) → mean over self + 10-NN → KMeans."""
    import scanpy as sc

    common = [g for g in samples[0].var_names if all(g in set(s.var_names) for s in samples[1:])]
    mats = []
    for s in samples:
        x, _ = log_normalized(s)
        mats.append(sp.csr_matrix(x[:, s.var_names.get_indexer(common)]))
    x = sp.vstack(mats).tocsr()
    if x.shape[1] > 2000:
        mean = np.asarray(x.mean(0)).ravel()
        var = np.asarray(x.multiply(x).mean(0)).ravel() - mean**2
        x = x[:, np.sort(np.argsort(-var, kind="stable")[:2000])]
    tmp = ad.AnnData(X=x)
    n_comps = int(min(30, x.shape[1] - 1, x.shape[0] - 1))
    sc.pp.pca(tmp, n_comps=n_comps, random_state=seed)
    pcs = tmp.obsm["X_pca"]
    smoothed, start = [], 0
    for s in samples:
        p = pcs[start : start + s.n_obs]
        start += s.n_obs
        k = min(11, s.n_obs)
        _, idx = NearestNeighbors(n_neighbors=k).fit(s.obsm["spatial"][:, :2]).kneighbors(s.obsm["spatial"][:, :2])
        smoothed.append(p[idx].mean(axis=1))
    lab = KMeans(n_clusters=n_domains, n_init=10, random_state=seed).fit_predict(np.vstack(smoothed))
    out, start = [], 0
    for s in samples:
        out.append(lab[start : start + s.n_obs])
        start += s.n_obs
    return out


def run_ours(task: DomainTask, seed: int = 0, **config: Any) -> tuple[list[float], float]:
    aris, secs, _ = _run_ours(task, seed, **config)
    return aris, secs


def _run_ours(task: DomainTask, seed: int = 0, **config: Any) -> tuple[list[float], float, Any]:
    t = time.perf_counter()
    outs, model = run_domains(task.samples, n_domains=task.n_domains, seed=seed, **config)
    return _ari(outs, task.truth), time.perf_counter() - t, model


def run_baseline(task: DomainTask, seed: int = 0) -> tuple[list[float], float]:
    t = time.perf_counter()
    labels = naive_baseline(task.samples, task.n_domains, seed)
    aris = [float(adjusted_rand_score(s.obs[task.truth].astype(str), lab)) for s, lab in zip(task.samples, labels)]
    return aris, time.perf_counter() - t


def run_domain_tasks(seed: int = 0, tasks: list[DomainTask] | None = None, **engine_config: Any) -> list[dict[str, Any]]:
    """Ours (the default engine, or ``engine_config``) vs the naive baseline on every dataset, one run.

    Stable keys (see the module docstring); ``passed`` is the acceptance line of the issue.
    """
    rows = []
    for task in tasks if tasks is not None else domain_tasks(seed):
        ours, t_ours, model = _run_ours(task, seed, **engine_config)
        target = getattr(model, "fit_stats", {}).get("library_target", {})
        base, t_base = run_baseline(task, seed)
        o, b = float(np.mean(ours)), float(np.mean(base))
        rows.append(
            {
                "dataset": task.name,
                "description": task.description,
                "n_obs": int(sum(s.n_obs for s in task.samples)),
                "n_genes": int(task.samples[0].n_vars),
                "n_samples": len(task.samples),
                "n_domains": task.n_domains,
                "ours": o,
                "baseline": b,
                "delta": o - b,
                "passed": bool(o >= b - TOLERANCE),
                "ours_per_sample": ours,
                "baseline_per_sample": base,
                "seconds_ours": t_ours,
                "seconds_baseline": t_base,
                "library_target": float(getattr(model, "library_target", float("nan"))),
                "structure_scores": dict(target.get("structure_scores", {})),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'dataset':<26} {'cells':>7} {'genes':>6} {'K':>3} {'ours':>6} {'naive':>6} {'delta':>7}  ok   (s ours / naive)"]
    for r in rows:
        lines.append(
            f"{r['dataset']:<26} {r['n_obs']:>7} {r['n_genes']:>6} {r['n_domains']:>3} {r['ours']:>6.3f} {r['baseline']:>6.3f} "
            f"{r['delta']:>+7.3f}  {'yes' if r['passed'] else 'NO ':<4} ({r['seconds_ours']:.1f} / {r['seconds_baseline']:.1f})"
        )
    for r in rows:
        if r.get("structure_scores"):
            scores = ", ".join(f"L={k}: {v:.4f}" for k, v in r["structure_scores"].items())
            lines.append(f"  {r['dataset']:<24} library target chosen {r['library_target']:.6g} (spatial structure score {scores})")
    ok = all(r["passed"] for r in rows)
    lines.append(f"acceptance: default engine >= naive baseline - {TOLERANCE} ARI on every dataset: {'MET' if ok else 'NOT MET'}")
    return "\n".join(lines)


#: alternatives measured by --sweep: name -> engine keywords (on top of the defaults)
ALTERNATIVES: dict[str, dict[str, Any]] = {
    "default": {},
    "v1 defaults (10k, unscaled, variance genes)": {"target_sum": 1e4, "scale_genes": False, "gene_selection": "variance"},
    "target: median library (fixed)": {"target_sum": "median"},
    "target: 10,000 (fixed)": {"target_sum": 1e4},
    "no gene scaling": {"scale_genes": False},
    "k-NN graph on spots too (no lattice detection)": {"coord_type": "generic"},
    "lattice neighbours on grids, 1 hop": {"grid_hops": 1},
    "lattice neighbours on grids, 2 hops": {"grid_hops": 2},
    "2 hops": {"n_hops": 2},
    "genes by variance": {"gene_selection": "variance"},
    "genes by HVG only": {"gene_selection": "hvg"},
    "genes by SVG (Moran's I) only": {"gene_selection": "svg"},
    "1,000 genes": {"max_genes": 1000},
    "no label refinement": {"smooth_rounds": 0},
    "2 refinement rounds": {"smooth_rounds": 2},
    "lambda 0.6": {"lam": 0.6},
}


def sweep(seed: int = 0, names: list[str] | None = None, out: Callable[[str], None] = print) -> pd.DataFrame:
    """ARI of every alternative on every dataset (one run), and the naive baseline; printed as it goes."""
    tasks = domain_tasks(seed)
    table: dict[str, dict[str, float]] = {}
    base = {t.name: float(np.mean(run_baseline(t, seed)[0])) for t in tasks}
    table["naive baseline"] = base
    out(f"{'naive baseline':<62} " + " ".join(f"{t.name[:14]:>14}={base[t.name]:.3f}" for t in tasks))
    for name, cfg in ALTERNATIVES.items():
        if names and name not in names:
            continue
        row = {}
        for t in tasks:
            row[t.name] = float(np.mean(run_ours(t, seed, **cfg)[0]))
        table[name] = row
        worst = min(row[n] - base[n] for n in row)
        out(f"{name:<62} " + " ".join(f"{t.name[:14]:>14}={row[t.name]:.3f}" for t in tasks)
            + f"  mean={np.mean(list(row.values())):.3f} worst-vs-naive={worst:+.3f}")
    return pd.DataFrame(table).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="measure every alternative in ALTERNATIVES")
    args = ap.parse_args()
    if args.sweep:
        sweep(args.seed)
        return
    rows = run_domain_tasks(args.seed)
    print(format_table(rows))


if __name__ == "__main__":
    main()
