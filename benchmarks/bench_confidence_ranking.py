"""Confidence ranking (AUROC of correct-vs-wrong calls) of candidate confidences on three cases.

Cases: POA (scRNA reference → MERFISH, real), synthetic 20k + 20k (generator defaults, seed 0), and
PBMC3k split into reference/query with a seeded simulated platform effect (``platform_split``, two
seeds). All candidates score the SAME calls (the product's), from the stored decision scores, so the
differences are ranking alone:
  softmax      product ``cell_type_confidence`` (temperature-scaled softmax maximum)
  raw          ``cell_type_confidence_raw`` (celltypist-style sigmoid of the top score)
  margin       top-1 minus top-2 tempered probability
  1-entropy    1 - H(p) / log K
  label-shift  posterior of the call after re-estimating the query composition (Saerens et al.
               2002 EM on the tempered softmax, training composition as the prior)
Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_confidence_ranking.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np

from spatial_assets.core import schema
from spatial_assets.celltyping.annotation import annotate
from spatial_assets.celltyping.pipeline import POA_LABEL_MAP, POA_PLACEHOLDERS, run_celltyping, score_against_labels
from spatial_assets.celltyping.references import DEFAULT_PLACEHOLDER_LABELS, ReferenceSpec
from spatial_assets.celltyping.synthetic import TYPE_SYNONYMS, platform_split, write_celltyping_data
from spatial_assets.celltyping.training import TrainedModel, train_model

DATA = Path(__file__).resolve().parents[1] / "data"
KINDS = ("softmax", "raw", "margin", "1-entropy", "label-shift")


def _candidates(out: ad.AnnData, model: TrainedModel) -> dict[str, np.ndarray]:
    D = np.asarray(out.obsm[schema.DECISION_SCORES_OBSM], dtype=np.float64)
    L = np.column_stack([np.zeros(len(D)), D[:, 1]]) if D.shape[1] == 2 and len(model.classes) == 2 else D
    Z = L / out.uns[schema.CELLTYPING_UNS]["temperature"]  # the temperature of the regime used
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    best, r = P.argmax(1), np.arange(len(P))
    Ps = np.sort(P, 1)
    prior = model.classifier.class_counts_ / model.classifier.class_counts_.sum()
    pi = prior.copy()
    for _ in range(200):
        Pa = P * (pi / prior)
        Pa /= Pa.sum(1, keepdims=True)
        new = Pa.mean(0)
        done = np.abs(new - pi).max() < 1e-6
        pi = new
        if done:
            break
    return {
        "softmax": out.obs[schema.CONFIDENCE].to_numpy(),
        "raw": out.obs[schema.CONFIDENCE_RAW].to_numpy(),
        "margin": Ps[:, -1] - Ps[:, -2],
        "1-entropy": 1 + (P * np.log(np.clip(P, 1e-300, None))).sum(1) / np.log(P.shape[1]),
        "label-shift": Pa[r, best],
    }


def _score(out: ad.AnnData, model: TrainedModel, truth: str, label_map: dict) -> dict[str, float]:
    res = {}
    for kind, conf in _candidates(out, model).items():
        s = score_against_labels(
            out.obs[schema.PREDICTED], out.obs[truth], label_map,
            confidence=conf, class_origins=out.uns[schema.LABEL_MAP_UNS],
        )  # fmt: skip
        res[kind] = s["confidence_auroc"]
        res["acc"], res["bal"] = s["accuracy"], s["balanced_accuracy"]
    res["alignment"] = out.uns[schema.CELLTYPING_UNS]["alignment"]
    return res


def main() -> None:
    cases: dict[str, dict] = {}
    merfish = ad.read_h5ad(DATA / "mouse_POA_MERFISH_Moffitt2018.h5ad")
    spec = ReferenceSpec(str(DATA / "mouse_POA_scRNA_ref_Moffitt2018.h5ad"), "cell_type")
    res = run_celltyping([spec], merfish, placeholder_labels=tuple(DEFAULT_PLACEHOLDER_LABELS) + POA_PLACEHOLDERS, seed=0)
    cases["POA scRNA -> MERFISH"] = _score(res.annotated, res.model, "Cell_class_major", POA_LABEL_MAP)

    with tempfile.TemporaryDirectory() as d:
        paths = write_celltyping_data(d, n_ref_cells=(14_000, 6_000), n_spatial=20_000, seed=0)
        spatial = ad.read_h5ad(paths["spatial"])
        sres = run_celltyping([ReferenceSpec(p, "cell_type") for p in paths["references"]], spatial, seed=0)
        lm = {s: pair[0] for pair in TYPE_SYNONYMS for s in pair}
        cases["synthetic 20k+20k"] = _score(sres.annotated, sres.model, "true_cell_type", lm)

    pbmc = ad.read_h5ad(DATA / "human_PBMC3k_400genes_seurat_labels.h5ad")
    for seed in (0, 1):
        ref, query = platform_split(pbmc, "seurat_annotations", seed=seed)
        model = train_model(ref, seed=0)
        out = annotate(query, model, seed=0)
        cases[f"PBMC3k split, platform seed {seed}"] = _score(out, model, "seurat_annotations", {c: c for c in model.classes})

    print(f"{'case':34s} {'align':9s} {'acc':>6s} {'bal':>6s}  " + "  ".join(f"{k:>11s}" for k in KINDS))
    for name, r in cases.items():
        print(f"{name:34s} {r['alignment']:9s} {r['acc']:6.3f} {r['bal']:6.3f}  " + "  ".join(f"{r[k]:11.4f}" for k in KINDS))
    means = {k: float(np.mean([r[k] for r in cases.values()])) for k in KINDS}
    worst = {k: float(np.min([r[k] - r["softmax"] for r in cases.values()])) for k in KINDS}
    print(f"{'mean AUROC':51s}  " + "  ".join(f"{means[k]:11.4f}" for k in KINDS))
    print(f"{'worst case difference vs softmax':51s}  " + "  ".join(f"{worst[k]:+11.4f}" for k in KINDS))


if __name__ == "__main__":
    np.seterr(all="ignore")
    t = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t:.1f} s")
