"""`spatial-assets celltype` through main([...]) on the real POA pair."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np

from spatial_assets.core import schema
from spatial_assets.cli import build_parser, main
from spatial_assets.celltyping.training import load_model

DATA = Path(__file__).resolve().parents[2] / "data"
REF = str(DATA / "mouse_POA_scRNA_ref_Moffitt2018.h5ad")
MERFISH = str(DATA / "mouse_POA_MERFISH_Moffitt2018.h5ad")


def test_celltype_writes_annotated_h5ad_and_summary(tmp_path, capsys):
    out = tmp_path / "sub" / "annotated.h5ad"
    model = tmp_path / "model.pkl"
    rc = main(
        [
            "celltype", "--reference", REF, "--label-column", "cell_type", "--spatial", MERFISH,
            "--out", str(out), "--confidence-threshold", "0.6", "--placeholder-label", "Ambiguous",
            "--placeholder-label", "Unstable", "--model-out", str(model),
        ]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mean confidence" in printed and "Unassigned fraction" in printed
    a = ad.read_h5ad(out)
    assert a.n_obs == 11162
    assert a.uns[schema.CELLTYPING_UNS]["confidence_threshold"] == 0.6
    conf = a.obs[schema.CONFIDENCE].to_numpy()
    unassigned = (a.obs[schema.CELL_TYPE].astype(str) == schema.UNASSIGNED).to_numpy()
    np.testing.assert_array_equal(unassigned, conf < 0.6)
    frac = float(printed.split("Unassigned fraction:")[1].split()[0])
    assert abs(frac - unassigned.mean()) < 1e-3
    sha = json.loads(Path(f"{model}.card.json").read_text())["sha256"]
    assert load_model(model, sha).genes == list(load_model(model, sha).classifier.features)
    assert not list(tmp_path.rglob("*.part"))


def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "annotated.h5ad"
    rc = main(["celltype", "--reference", REF, "--label-column", "no_such_column", "--spatial", MERFISH, "--out", str(out)])
    assert rc != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_such_column" in err
    assert list(tmp_path.iterdir()) == []
    rc = main(["celltype", "--reference", REF, "--label-column", "cell_type", "--spatial", str(tmp_path / "nope.h5ad"), "--out", str(out)])
    assert rc != 0 and "nope.h5ad" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_subcommands_are_registered_by_functions():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "celltype" in sub.choices
