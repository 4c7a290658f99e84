"""The cell-typing choices exposed to users: CLI ``--reg-per-cell`` / ``--alignment`` / default threshold,
and the platform settings passing them to training and annotation; every choice recorded."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.cli import build_parser, main
from spatial_assets.core import schema


def _files(tmp_path: Path, seed: int = 0) -> tuple[str, str]:
    """A small raw-count reference (4 classes) and a spatial sample of the same platform."""
    rng = np.random.default_rng(seed)
    k, g = 4, 24
    mu = np.full((k, g), 3.0)
    for i in range(k):
        mu[i, i * 5 : i * 5 + 5] *= 4.0

    def counts(y: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix(rng.poisson(rng.gamma(4.0, mu[y] / 4.0)).astype(np.float32))

    genes = pd.DataFrame(index=[f"G{i}" for i in range(g)])
    yr = np.repeat(np.arange(k), 60)
    ref = ad.AnnData(X=counts(yr), obs=pd.DataFrame({"label": [f"type{i}" for i in yr]}, index=[f"r{i}" for i in range(len(yr))]), var=genes)
    yq = rng.integers(0, k, 300)
    q = ad.AnnData(X=counts(yq), obs=pd.DataFrame({"truth": [f"type{i}" for i in yq]}, index=[f"q{i}" for i in range(len(yq))]), var=genes)
    q.obsm["spatial"] = rng.uniform(0, 100, size=(q.n_obs, 2))
    ref.write_h5ad(tmp_path / "ref.h5ad")
    q.write_h5ad(tmp_path / "spatial.h5ad")
    return str(tmp_path / "ref.h5ad"), str(tmp_path / "spatial.h5ad")


def test_cli_options_parse_with_data_driven_defaults():
    parser = build_parser()
    base = ["celltype", "--reference", "r.h5ad", "--label-column", "l", "--spatial", "s.h5ad", "--out", "o.h5ad"]
    args = parser.parse_args(base)
    assert args.reg_per_cell == "auto" and args.alignment == "auto" and args.confidence_threshold is None
    args = parser.parse_args(base + ["--reg-per-cell", "0.05", "--alignment", "recenter"])
    assert args.reg_per_cell == 0.05 and args.alignment == "recenter"
    for bad in (["--reg-per-cell", "strong"], ["--reg-per-cell", "0"], ["--alignment", "sideways"]):
        with pytest.raises(SystemExit):
            parser.parse_args(base + bad)


def test_cli_records_the_options_and_the_model_threshold(tmp_path, capsys):
    ref, spatial = _files(tmp_path)
    out = tmp_path / "a.h5ad"
    model = tmp_path / "m.pkl"
    rc = main(["celltype", "--reference", ref, "--label-column", "label", "--spatial", spatial, "--out", str(out),
               "--reg-per-cell", "0.05", "--alignment", "recenter", "--model-out", str(model)])  # fmt: skip
    assert rc == 0
    info = ad.read_h5ad(out).uns[schema.CELLTYPING_UNS]
    assert info["alignment_requested"] == "recenter" and info["alignment"] == "recenter"
    assert list(info["reg_per_cell"]) == [0.05]
    card = json.loads(Path(f"{model}.card.json").read_text())
    assert card["parameters"]["reg_per_cell"] == [0.05]
    # no --confidence-threshold: the model's own, where held-out reference cells reach the target precision
    assert info["threshold_source"].startswith("model")
    assert info["confidence_threshold"] == pytest.approx(card["regimes"][info["regime"]]["threshold"]["threshold"])
    assert "confidence threshold" in capsys.readouterr().out
    # defaults: auto everywhere, recorded with the reason
    rc = main(["celltype", "--reference", ref, "--label-column", "label", "--spatial", spatial, "--out", str(tmp_path / "b.h5ad")])
    assert rc == 0
    info = ad.read_h5ad(tmp_path / "b.h5ad").uns[schema.CELLTYPING_UNS]
    assert info["alignment_requested"] == "auto" and info["regime"] == "same_platform" and info["alignment"] == "none"
    assert "shift index" in info["regime_reason"] and "CV" in info["regularization_reason"]


def test_platform_settings_pass_the_options_through(tmp_path):
    from spatial_assets.defs.settings import PlatformSettings
    from spatial_assets.platform.workflow import annotate_sample, train_celltype_model

    defaults = PlatformSettings()
    assert defaults.reg_per_cell == "auto" and defaults.alignment == "auto" and defaults.confidence_threshold is None
    assert defaults.min_cells_per_type == 3
    ref_path, spatial_path = _files(tmp_path)
    ref = ad.read_h5ad(ref_path)
    X = ref.X.toarray()
    ref.X = sp.csr_matrix(np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32))
    ref.obs = pd.DataFrame({schema.CELL_TYPE: ref.obs["label"].to_numpy()}, index=ref.obs_names)
    ref.uns["content_sha256"] = "0" * 64
    settings = PlatformSettings(reg_per_cell="0.02", alignment="none")
    model = train_celltype_model(ref, settings)
    assert model.card["parameters"]["reg_per_cell"] == [0.02]
    annotated = annotate_sample(ad.read_h5ad(spatial_path), model, settings, run_id="r1", sample_id="s1")
    info = annotated.uns[schema.CELLTYPING_UNS]
    assert info["alignment_requested"] == "none" and info["threshold_source"].startswith("model")
    prov = annotated.uns[schema.PROVENANCE_UNS]
    assert prov["confidence_threshold"] == pytest.approx(info["confidence_threshold"])
    assert prov["alignment"] == "none" and prov["regime"] == info["regime"]


def test_decision_and_model_metadata_are_json_ready(tmp_path):
    from spatial_assets.celltyping.annotation import annotate
    from spatial_assets.celltyping.pipeline import decision_metadata, model_metadata
    from spatial_assets.celltyping.training import train_model

    ref_path, spatial_path = _files(tmp_path)
    ref = ad.read_h5ad(ref_path)
    X = ref.X.toarray()
    ref.X = sp.csr_matrix(np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32))
    ref.obs = pd.DataFrame({schema.CELL_TYPE: ref.obs["label"].to_numpy()}, index=ref.obs_names)
    model = train_model(ref)
    out = annotate(ad.read_h5ad(spatial_path), model)
    meta = decision_metadata(out)
    json.dumps(meta, allow_nan=False)  # plain JSON, no NaN
    assert meta["regime"] == out.uns[schema.CELLTYPING_UNS]["regime"] and "shift index" in meta["regime_reason"]
    assert meta["coverage_curve_reference"]["threshold"] and meta["confidence_threshold"] > 0
    mm = model_metadata(model)
    json.dumps(mm, allow_nan=False)
    assert set(mm["regimes"]) == {"same_platform", "shifted"} and mm["cv_grid"]
    assert mm["regimes"]["same_platform"]["threshold_verified"] and not mm["regimes"]["shifted"]["threshold_verified"]
