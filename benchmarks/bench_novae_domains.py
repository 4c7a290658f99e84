"""Novae domains on STARmap mPFC (3 slices, truth obs['layer'], K=4), in the settings possible offline.

Prints per-slice and mean ARI, wall time, peak RSS and collapse diagnostics for:

- ``zero_shot``  — untrained Novae network (random GAT, PCA-initialised gene embeddings), k-means
                   prototypes on its latents: no training at all;
- ``train``      — trained from scratch with deliberate short settings (epochs × limit_train_batches);
- ``fine_tune``  — from a checkpoint made HERE (no hub offline): a model trained on synthetic tissue
                   that uses the STARmap gene names, saved, reloaded and validated, then fine-tuned;
- baseline       — neighbourhood-smoothed PCA + k-means, measured in the same run (ratio column).

Every Novae config runs in its own subprocess so "peak RSS" is that config's, not the sum of history.
Whole run ≈ 5–9 min on 2 shared cores. ``--sweep`` adds seconds-per-training-step for threads 1/2
and heads 4/8 (docs/novae.md).

Other benchmarks call :func:`starmap_ari` to print Novae's number beside theirs (in-process: its
peak RSS is then that process's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STARMAP = ROOT / "data" / "mouse_mPFC_STARmap_Wang2018.h5ad"
TRAIN_SETTINGS: dict[str, Any] = {
    "max_epochs": 3,
    "limit_train_batches": 6,
    "patience": 2,
    "min_delta": 0.05,
    "model_kwargs": {"heads": 4},  # heads drive CPU cost (4 heads ≈ 2.8x faster than 8; measured-facts.md)
}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _slices(path: Path = STARMAP) -> list[Any]:
    import anndata as ad

    adata = ad.read_h5ad(path)
    out = []
    for name in sorted(adata.obs["slice"].astype(str).unique()):
        s = adata[(adata.obs["slice"].astype(str) == name).to_numpy()].copy()
        s.uns["source_path"] = f"{path.name}[slice={name}]"
        out.append(s)
    return out


def starmap_ari(
    mode: str = "zero_shot",
    *,
    n_domains: int = 4,
    seed: int = 0,
    threads: int = 1,
    data_path: str | Path = STARMAP,
    save_dir: str | Path | None = None,
    **engine_kwargs: Any,
) -> dict[str, Any]:
    """Fit ONE Novae model on all three STARmap slices, assign each, score ARI against ``layer``."""
    from sklearn.metrics import adjusted_rand_score

    from spatial_assets.domains.novae.engine import NovaeDomainEngine

    slices = _slices(Path(data_path))
    t0 = time.perf_counter()
    engine = NovaeDomainEngine(mode=mode, threads=threads, **engine_kwargs)  # type: ignore[arg-type]
    model = engine.fit(slices, levels=[n_domains], n_domains=n_domains, seed=seed)
    t_fit = time.perf_counter() - t0
    per_slice = {}
    for s in slices:
        out = model.assign(s)
        truth = s.obs["layer"].astype(str)
        per_slice[str(s.obs["slice"].iloc[0])] = float(adjusted_rand_score(truth, out.obs["domain"]))
    t_all = time.perf_counter() - t0
    if save_dir is not None:
        model.save(save_dir)
    meta = model.metadata()
    return {
        "engine": "novae",
        "mode": mode,
        "per_slice_ari": per_slice,
        "mean_ari": float(np.mean(list(per_slice.values()))),
        "fit_seconds": round(t_fit, 1),
        "assign_seconds": round(t_all - t_fit, 1),
        "wall_seconds": round(t_all, 1),
        "peak_rss_mib": round(_peak_rss_mib(), 0),
        "collapse": meta["collapse"],
        "seconds": meta["seconds"],
        "params": meta["params"],
    }


def baseline_ari(n_domains: int = 4, seed: int = 0, data_path: str | Path = STARMAP) -> dict[str, Any]:
    """Neighbourhood-smoothed PCA + k-means (2-hop mean over 6-NN), the README's baseline recipe."""
    import scanpy as sc
    import scipy.sparse as sp
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import NearestNeighbors

    t0 = time.perf_counter()
    per_slice = {}
    for s in _slices(Path(data_path)):
        a = s.copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        pcs = PCA(n_components=20, random_state=seed).fit_transform(x)
        _, idx = NearestNeighbors(n_neighbors=7).fit(a.obsm["spatial"]).kneighbors(a.obsm["spatial"])
        n = a.n_obs
        adj = sp.csr_matrix((np.ones(idx.size), (np.repeat(np.arange(n), idx.shape[1]), idx.ravel())), shape=(n, n))
        adj = ((adj + adj.T) > 0).astype(np.float64)
        two_hop = ((adj @ adj + adj) > 0).astype(np.float64)
        smooth = sp.diags(1.0 / np.asarray(two_hop.sum(1)).ravel()) @ two_hop @ pcs
        labels = KMeans(n_domains, random_state=seed, n_init=10).fit_predict(smooth)
        per_slice[str(s.obs["slice"].iloc[0])] = float(adjusted_rand_score(s.obs["layer"].astype(str), labels))
    return {
        "engine": "baseline smoothed PCA+KMeans",
        "per_slice_ari": per_slice,
        "mean_ari": float(np.mean(list(per_slice.values()))),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


def make_local_checkpoint(directory: str | Path, *, seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """The only checkpoint possible offline: train on synthetic tissue whose genes carry the STARmap
    names (so the vocabulary covers the target), save it. Returns the pre-training record."""
    import anndata as ad

    from spatial_assets.domains.novae.engine import NovaeDomainEngine
    from spatial_assets.domains.synthetic import make_synthetic_tissue, split_samples

    genes = list(ad.read_h5ad(STARMAP, backed="r").var_names)
    tissue = make_synthetic_tissue(3000, n_domains=4, n_samples=2, n_genes=len(genes), seed=seed)
    tissue.var_names = genes
    t0 = time.perf_counter()
    model = NovaeDomainEngine(mode="train", threads=threads, **TRAIN_SETTINGS).fit(
        split_samples(tissue), levels=[4], n_domains=4, seed=seed
    )
    model.save(directory)
    return {"pretrain_seconds": round(time.perf_counter() - t0, 1), "collapse": model.metadata()["collapse"]}


def step_seconds(threads: int, heads: int, steps: int = 5, seed: int = 0) -> float:
    """Median seconds per training step (batch 256) on STARmap, timed inside the Lightning loop."""
    from spatial_assets.domains.novae.engine import NovaeDomainEngine

    eng = NovaeDomainEngine(mode="train", threads=threads, max_epochs=1, limit_train_batches=steps + 1,
                            model_kwargs={"heads": heads})
    m = eng.fit(_slices(), levels=[4], n_domains=4, seed=seed)
    return float(m.metadata()["seconds"]["train_step_median"])


def _one(name: str, workdir: Path) -> dict[str, Any]:
    """One configuration (runs inside a subprocess)."""
    if name == "baseline":
        return baseline_ari()
    if name == "zero_shot":  # random network: the seed matters, so three of them
        res = starmap_ari("zero_shot")
        others = {s: starmap_ari("zero_shot", seed=s)["mean_ari"] for s in (1, 2)}
        res["mean_ari_by_seed"] = {0: res["mean_ari"], **others}
        res["peak_rss_mib"] = round(_peak_rss_mib(), 0)
        return res
    if name == "train":
        return starmap_ari("train", **TRAIN_SETTINGS)
    if name == "train_long":  # not in the default run: ~100 steps, to see whether more training helps
        return starmap_ari("train", **{**TRAIN_SETTINGS, "max_epochs": 10, "limit_train_batches": 10, "patience": 3})
    if name == "fine_tune":
        ckpt = workdir / "synthetic_pretrained"
        pre = make_local_checkpoint(ckpt)
        res = starmap_ari(
            "fine_tune", pretrained_dir=str(ckpt), max_epochs=2, limit_train_batches=6, patience=2, min_delta=0.05
        )
        res["pretraining"] = pre
        res["peak_rss_mib"] = round(_peak_rss_mib(), 0)
        return res
    if name.startswith("step_t"):
        t, h = name[len("step_t"):].split("_h")
        return {"threads": int(t), "heads": int(h), "seconds_per_step": round(step_seconds(int(t), int(h)), 2),
                "peak_rss_mib": round(_peak_rss_mib(), 0)}
    raise SystemExit(f"unknown config {name}")


def _run_subprocess(name: str, workdir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--one", name, "--workdir", str(workdir)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "wall_seconds_process": round(time.perf_counter() - t0, 1)}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_seconds_process"] = round(time.perf_counter() - t0, 1)
    return res


def _fmt(name: str, r: dict[str, Any], base: float | None) -> str:
    if "error" in r:
        return f"{name:<11} ERROR {r['error'][-300:]}"
    ps = " ".join(f"{v:6.3f}" for v in r["per_slice_ari"].values())
    ratio = f"{r['mean_ari'] / base:5.2f}x" if base else "  -  "
    c = r.get("collapse", {})
    diag = (
        f"rank={c.get('latent_effective_rank', '-')} protos_used={c.get('prototypes_used', '-')}"
        f" loss/lnK={c.get('train_loss_over_ln_prototypes', '-')}"
        f" entropy={c.get('train_final_entropy_normalized', '-')}"
        f" epochs={c.get('train_epochs', '-')} steps={c.get('train_steps', '-')} collapsed={c.get('collapsed', '-')}"
    )
    return (
        f"{name:<11} slices [{ps}] mean {r['mean_ari']:.3f} ({ratio} baseline)  wall {r.get('wall_seconds', '-')} s"
        f" (process {r.get('wall_seconds_process', '-')} s)  peak RSS {r.get('peak_rss_mib', '-')} MiB"
        f"  {diag if c else ''}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--configs", default="baseline,zero_shot,train,fine_tune",
                    help="comma list; also available: train_long (~100 steps)")
    ap.add_argument("--sweep", action="store_true", help="also time training steps for threads 1/2, heads 4/8")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, Path(args.workdir))))
        return
    print(f"STARmap mPFC, K=4, one model on 3 slices; load average at start {os.getloadavg()[0]:.1f}"
          f" on {os.cpu_count()} cores")
    print(f"train settings: {json.dumps(TRAIN_SETTINGS)}; fine-tune: 2 epochs x 6 batches from a"
          " synthetic-pretrained local checkpoint")
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            results[name] = _run_subprocess(name, Path(tmp))
            base = results.get("baseline", {}).get("mean_ari")
            print(_fmt(name, results[name], None if name == "baseline" else base), flush=True)
            if "mean_ari_by_seed" in results[name]:
                by = results[name]["mean_ari_by_seed"]
                print(f"            mean ARI by seed {json.dumps({k: round(v, 3) for k, v in by.items()})}; "
                      f"mean over seeds {np.mean(list(by.values())):.3f}")
            if name == "fine_tune" and "pretraining" in results[name]:
                pc = results[name]["pretraining"]
                print(f"            pretraining (synthetic, STARmap genes): {pc['pretrain_seconds']} s,"
                      f" collapse: {pc['collapse']}")
        if args.sweep:
            for t, h in ((1, 4), (2, 4), (1, 8)):
                r = _run_subprocess(f"step_t{t}_h{h}", Path(tmp))
                sps = r.get("seconds_per_step", r.get("error", "")[-300:])
                print(f"step time threads={t} heads={h}: {sps} s/step (batch 256)", flush=True)
    print(f"total wall {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    for name, r in results.items():
        if "collapse" in r:
            print(f"{name} collapse diagnostics: {json.dumps(r['collapse'])}")


if __name__ == "__main__":
    main()
