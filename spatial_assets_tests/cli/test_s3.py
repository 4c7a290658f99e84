"""`spatial-assets celltype` reading references and the sample from S3 and writing back to S3."""

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from spatial_assets.cli import main
from spatial_assets.cli.celltype import mapping_table_path
from spatial_assets.storage.stores import S3Store

DATA = Path(__file__).resolve().parents[2] / "data"


def test_celltype_cli_on_s3(s3_env, s3_bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    store = S3Store(s3_bucket, "", s3_env, cache_dir=tmp_path / "cache")
    store.put_file(DATA / "mouse_POA_scRNA_ref_Moffitt2018.h5ad", "refs/poa.h5ad")
    merfish = ad.read_h5ad(DATA / "mouse_POA_MERFISH_Moffitt2018.h5ad")[:2500].copy()
    merfish.write_h5ad(tmp_path / "q.h5ad")
    store.put_file(tmp_path / "q.h5ad", "samples/q.h5ad")
    out = f"s3://{s3_bucket}/results/q_annotated.h5ad"
    code = main([
        "celltype", "--reference", f"s3://{s3_bucket}/refs/poa.h5ad", "--label-column", "cell_type",
        "--placeholder-label", "Ambiguous", "--placeholder-label", "Unstable",
        "--spatial", f"s3://{s3_bucket}/samples/q.h5ad", "--out", out, "--confidence-threshold", "0.5",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Unassigned fraction" in printed and "mean confidence" in printed
    annotated = ad.read_h5ad(store.get_file("results/q_annotated.h5ad"))
    assert annotated.n_obs == 2500
    conf = annotated.obs["cell_type_confidence"].to_numpy()
    assert np.all((conf >= 0) & (conf <= 1))
    assert ((annotated.obs["cell_type"] == "Unassigned") == (conf < 0.5)).all()
    mapping = pd.read_csv(store.get_file(mapping_table_path("results/q_annotated.h5ad")))
    assert {"label", "ontology_term_id", "tier", "score"} <= set(mapping.columns)
    assert mapping.loc[mapping["label"] == "Astrocytes", "ontology_term_id"].iloc[0] == "CL:0000127"


def test_celltype_cli_bad_input_writes_nothing_to_s3(s3_env, s3_bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    store = S3Store(s3_bucket, "", s3_env, cache_dir=tmp_path / "cache")
    store.put_file(DATA / "mouse_POA_scRNA_ref_Moffitt2018.h5ad", "refs/poa.h5ad")
    store.put_file(DATA / "mouse_POA_MERFISH_Moffitt2018.h5ad", "samples/q.h5ad")
    code = main([
        "celltype", "--reference", f"s3://{s3_bucket}/refs/poa.h5ad", "--label-column", "no_such_column",
        "--spatial", f"s3://{s3_bucket}/samples/q.h5ad", "--out", f"s3://{s3_bucket}/results/x.h5ad",
    ])
    assert code == 2
    err = capsys.readouterr().err
    assert "no_such_column" in err and "cell_type" in err  # names the column and lists the available ones
    assert store.list("results/") == []
