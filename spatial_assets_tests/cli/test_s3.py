"""`spatial-assets celltype` reading references and the sample from S3 and writing back to S3."""

import anndata as ad
import numpy as np
import pandas as pd

from spatial_assets.cli import main
from spatial_assets.cli.celltype import mapping_table_path
from spatial_assets.storage.stores import S3Store


def test_celltype_cli_on_s3(s3_env, s3_bucket, tmp_path, monkeypatch, capsys, poa_reference_path, load_merfish):
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    store = S3Store(s3_bucket, "", s3_env, cache_dir=tmp_path / "cache")
    store.put_file(poa_reference_path, "refs/poa.h5ad")
    merfish = load_merfish()[:2500].copy()
    merfish.write_h5ad(tmp_path / "q.h5ad")
    store.put_file(tmp_path / "q.h5ad", "samples/q.h5ad")
    out = f"s3://{s3_bucket}/results/q_annotated.h5ad"
    code = main([
        "celltype", "--reference", f"s3://{s3_bucket}/refs/poa.h5ad", "--label-column", "cell_type",
        "--placeholder-label", "Ambiguous", "--placeholder-label", "Unstable",
        "--spatial", f"s3://{s3_bucket}/samples/q.h5ad", "--out", out, "--confidence-threshold", "0.5",
        "--model-out", f"s3://{s3_bucket}/results/model.pkl",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Unassigned fraction" in printed and "mean confidence" in printed
    listed = {line.split()[-1] for line in printed.split("files written:\n", 1)[1].splitlines() if line.startswith("  ")}
    keys = ["results/q_annotated.h5ad", "results/q_annotated.label_mapping.csv", "results/model.pkl", "results/model.pkl.card.json"]
    assert listed == {f"s3://{s3_bucket}/{k}" for k in keys}
    assert sorted(o.key for o in store.list("results/")) == sorted(keys)
    annotated = ad.read_h5ad(store.get_file("results/q_annotated.h5ad"))
    assert annotated.n_obs == 2500
    conf = annotated.obs["cell_type_confidence"].to_numpy()
    assert np.all((conf >= 0) & (conf <= 1))
    assert ((annotated.obs["cell_type"] == "Unassigned") == (conf < 0.5)).all()
    mapping = pd.read_csv(store.get_file(mapping_table_path("results/q_annotated.h5ad")))
    assert {"label", "ontology_term_id", "tier", "score"} <= set(mapping.columns)
    assert mapping.loc[mapping["label"] == "Astrocytes", "ontology_term_id"].iloc[0] == "CL:0000127"


def test_celltype_cli_bad_input_writes_nothing_to_s3(s3_env, s3_bucket, tmp_path, monkeypatch, capsys, poa_reference_path, merfish_path):
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    store = S3Store(s3_bucket, "", s3_env, cache_dir=tmp_path / "cache")
    store.put_file(poa_reference_path, "refs/poa.h5ad")
    store.put_file(merfish_path, "samples/q.h5ad")
    code = main([
        "celltype", "--reference", f"s3://{s3_bucket}/refs/poa.h5ad", "--label-column", "no_such_column",
        "--spatial", f"s3://{s3_bucket}/samples/q.h5ad", "--out", f"s3://{s3_bucket}/results/x.h5ad",
    ])
    assert code == 2
    err = capsys.readouterr().err
    assert "no_such_column" in err and "cell_type" in err  # names the column and lists the available ones
    assert store.list("results/") == []
