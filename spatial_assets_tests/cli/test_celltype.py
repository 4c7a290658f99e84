"""`spatial-assets celltype` through main([...]) on the real POA pair."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from spatial_assets.cli import main
from spatial_assets.cli.celltype import mapping_table_path
from spatial_assets.celltyping.plots import PLOT_FILES
from spatial_assets.celltyping.training import load_model
from spatial_assets.core import schema

PROGRESS_LINE = re.compile(r"^\[\s*\d+\.\d+s\] \S")


def _files_written(stdout: str) -> dict[str, str]:
    """The summary's ``files written:`` block as {path: what}."""
    block = stdout.split("files written:\n", 1)[1]
    out = {}
    for line in block.splitlines():
        if not line.startswith("  "):
            break
        what, path = line.strip().rsplit(None, 1)
        out[path] = what
    return out


def test_celltype_writes_everything_it_lists_and_reports_progress(tmp_path, capsys, poa_reference_path, merfish_path):
    out = tmp_path / "sub" / "annotated.h5ad"
    model = tmp_path / "model.pkl"
    plots = tmp_path / "plots"
    rc = main(
        [
            "celltype", "--reference", str(poa_reference_path), "--label-column", "cell_type",
            "--spatial", str(merfish_path), "--out", str(out), "--confidence-threshold", "0.6",
            "--placeholder-label", "Ambiguous", "--placeholder-label", "Unstable",
            "--model-out", str(model), "--plots", str(plots),
        ]
    )  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    printed, progress = captured.out, captured.err.splitlines()

    # one progress line per long step, each with the elapsed time, in order
    assert progress and all(PROGRESS_LINE.match(line) for line in progress), progress
    steps = ["reading spatial sample", "training model on", "annotating", "writing annotated h5ad", "plotting"]
    positions = [next(i for i, line in enumerate(progress) if s in line) for s in steps]
    assert positions == sorted(positions)
    training_line = progress[positions[1]]
    n_cells, n_genes = (int(x.replace(",", "")) for x in re.search(r"on ([\d,]+) cells × ([\d,]+) genes", training_line).groups())
    card = json.loads(Path(f"{model}.card.json").read_text())
    assert (n_cells, n_genes) == (card["n_cells"], len(card["genes"]))  # the line states the real training shape
    elapsed = [float(re.match(r"^\[\s*([\d.]+)s\]", line).group(1)) for line in progress]
    assert elapsed == sorted(elapsed)

    # the summary lists every file written, and every listed file exists
    written = _files_written(printed)
    expected = {str(out), mapping_table_path(str(out)), str(model), f"{model}.card.json"}
    expected |= {str(plots / name) for name in PLOT_FILES.values()}
    assert set(written) == expected
    on_disk = {str(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert on_disk == expected  # nothing else (no temporary files) left behind

    a = ad.read_h5ad(out)
    assert a.n_obs == 11162
    assert a.uns[schema.CELLTYPING_UNS]["confidence_threshold"] == 0.6
    conf = a.obs[schema.CONFIDENCE].to_numpy()
    unassigned = (a.obs[schema.CELL_TYPE].astype(str) == schema.UNASSIGNED).to_numpy()
    np.testing.assert_array_equal(unassigned, conf < 0.6)
    frac = float(printed.split("Unassigned fraction:")[1].split()[0])
    assert abs(frac - unassigned.mean()) < 1e-3
    # placeholders were dropped before training: they are no class of the model
    loaded = load_model(model, card["sha256"])
    assert not {"Ambiguous", "Unstable"} & set(loaded.classes)
    assert loaded.genes == list(loaded.classifier.features)
    mapping = pd.read_csv(mapping_table_path(str(out)))
    assert {"label", "ontology_term_id"} <= set(mapping.columns)


def test_bad_column_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, poa_reference_path, merfish_path):
    out = tmp_path / "annotated.h5ad"
    rc = main(["celltype", "--reference", str(poa_reference_path), "--label-column", "no_such_column",
               "--spatial", str(merfish_path), "--out", str(out)])  # fmt: skip
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not PROGRESS_LINE.match(line)]
    assert len(err) == 1 and err[0].startswith("error: ") and "no_such_column" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_reference_and_label_column_counts_must_match(tmp_path, capsys, poa_reference_path, merfish_path):
    rc = main(["celltype", "--reference", str(poa_reference_path), "--reference", str(poa_reference_path),
               "--label-column", "cell_type", "--spatial", str(merfish_path), "--out", str(tmp_path / "o.h5ad")])  # fmt: skip
    assert rc == 2
    assert "2 references, 1 label columns" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
