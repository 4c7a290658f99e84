"""``spatial-assets segment`` end to end on the CosMx FOV; bad input writes nothing."""

from __future__ import annotations

import re

import anndata as ad
import geopandas as gpd
import pandas as pd

from spatial_assets.cli import build_parser, main

from .conftest import COSMX, copy_fixture


def test_segment_writes_three_outputs(tmp_path, capsys):
    out = tmp_path / "res" / "lung.h5ad"
    assert main(["segment", "--input", str(COSMX), "--method", "watershed", "--expand-um", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    cells = ad.read_h5ad(out)
    b = gpd.read_parquet(tmp_path / "res" / "lung.boundaries.parquet")
    t = pd.read_parquet(tmp_path / "res" / "lung.transcripts.parquet")
    assert len(t) == 12542 and t["transcript_index"].tolist() == list(range(12542))
    assert set(t["cell_id"].dropna()) <= set(cells.obs_names)
    assert list(b["cell_id"]) == list(cells.obs_names) and b.geometry.is_valid.all()
    assert cells.uns["segmentation"]["parameters"]["expand_um"] == 5.0
    assert f"{cells.n_obs} cells" in printed.out and "assigned transcripts" in printed.out and "median transcripts per cell" in printed.out
    # the shared CLI conventions: timed progress lines on stderr, every file written listed at the end
    assert re.search(r"^\[\s*\d+\.\ds\] reading ", printed.err, re.M), printed.err
    written = printed.out.split("files written:")[1]
    for name in ("lung.h5ad", "lung.boundaries.parquet", "lung.transcripts.parquet"):
        assert str(tmp_path / "res" / name) in written
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["lung.boundaries.parquet", "lung.h5ad", "lung.transcripts.parquet"]


def test_bad_input_writes_nothing(tmp_path, capsys):
    d = copy_fixture(COSMX, tmp_path)
    (d / "Lung12_fov_positions_file.csv").write_text("fov,x_global_px,y_global_px\n9,0,0\n")
    out = tmp_path / "res" / "x.h5ad"
    assert main(["segment", "--input", str(d), "--out", str(out)]) == 2
    assert "Lung12_fov_positions_file.csv" in capsys.readouterr().err
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["segment", "--input", str(empty), "--out", str(out)]) == 2
    assert "no known platform" in capsys.readouterr().err


def test_registered_in_main_parser():
    args = build_parser().parse_args(["segment", "--input", "x", "--out", "y.h5ad", "--platform", "merscope", "--z", "1"])
    assert args.platform == "merscope" and args.z == "1" and args.method is None


def test_out_must_be_h5ad_is_bad_input(tmp_path, capsys):
    assert main(["segment", "--input", str(COSMX), "--out", str(tmp_path / "x.zarr")]) == 2
    assert "--out must end with .h5ad" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
