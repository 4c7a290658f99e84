"""`spatial-assets sample land` against the deployment's storage: real SeaweedFS S3 and local files."""

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from spatial_assets.cli import main
from spatial_assets.core.spatial import panel_genes
from spatial_assets.platform.panels import panel_id
from spatial_assets.platform.registry import LANDING_PREFIX, scan_landing
from spatial_assets.storage.stores import LocalStore, S3Store

DATA = Path(__file__).resolve().parents[2] / "data"
MERFISH = DATA / "mouse_POA_MERFISH_Moffitt2018.h5ad"


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "s.h5ad"
    ad.read_h5ad(MERFISH)[:500].copy().write_h5ad(path)
    return path


@pytest.fixture()
def s3_deployment(s3_env, s3_bucket, tmp_path, monkeypatch) -> S3Store:
    monkeypatch.setenv("SPATIAL_ASSETS_DEPLOYMENT", "s3")
    monkeypatch.setenv("SPATIAL_ASSETS_BUCKET", s3_bucket)
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    return S3Store(s3_bucket, "", s3_env, cache_dir=tmp_path / "cache")


@pytest.fixture()
def local_deployment(tmp_path, monkeypatch) -> LocalStore:
    monkeypatch.setenv("SPATIAL_ASSETS_DEPLOYMENT", "local")
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(tmp_path / "home"))
    return LocalStore(tmp_path / "home" / "storage")


def _land(*args) -> int:
    return main(["sample", "land", *map(str, args)])


@pytest.mark.parametrize("deployment", ["s3_deployment", "local_deployment"])
def test_sample_land_puts_the_file_where_the_sensor_looks(deployment, small_sample, request, capsys):
    store = request.getfixturevalue(deployment)
    assert _land("--id", "s1", small_sample) == 0
    out = capsys.readouterr().out
    assert "landed sample 's1'" in out and "500 cells" in out
    assert panel_id(panel_genes(ad.read_h5ad(small_sample))) in out
    (landed,), problems = scan_landing(store, LANDING_PREFIX)
    assert problems == [] and landed.sample_id == "s1" and landed.keys == ("landing/samples/s1.h5ad",)
    assert store.read_bytes("landing/samples/s1.h5ad") == small_sample.read_bytes()  # the bytes as given


def test_duplicate_id_is_refused_unless_replace(s3_deployment, small_sample, tmp_path, capsys):
    store = s3_deployment
    assert _land("--id", "s1", small_sample) == 0
    before = store.info("landing/samples/s1.h5ad").etag
    other = tmp_path / "other.h5ad"
    ad.read_h5ad(MERFISH)[500:800].copy().write_h5ad(other)
    capsys.readouterr()
    assert _land("--id", "s1", other) == 2
    err = capsys.readouterr().err
    assert "'s1' has already landed" in err and "--replace" in err
    assert store.info("landing/samples/s1.h5ad").etag == before
    assert _land("--id", "s1", other, "--replace") == 0
    assert "replaced sample 's1'" in capsys.readouterr().out
    assert ad.read_h5ad(store.get_file("landing/samples/s1.h5ad")).n_obs == 300


def test_replacing_a_folder_sample_leaves_one_h5ad(local_deployment, small_sample, tmp_path):
    store = local_deployment
    store.put_file(small_sample, "landing/samples/s1/cells.h5ad")  # landed by hand, folder form
    assert _land("--id", "s1", small_sample, "--replace") == 0
    (landed,), _ = scan_landing(store, LANDING_PREFIX)
    assert landed.keys == ("landing/samples/s1.h5ad",)


def _no_coordinates(tmp_path: Path) -> Path:
    a = ad.read_h5ad(MERFISH)[:100].copy()
    del a.obsm["spatial"]
    a.obs = a.obs.drop(columns=[c for c in ("x", "y") if c in a.obs])
    path = tmp_path / "nocoords.h5ad"
    a.write_h5ad(path)
    return path


def _duplicate_cells(tmp_path: Path) -> Path:
    a = ad.read_h5ad(MERFISH)[:100].copy()
    a.obs_names = ["c1"] * 50 + [f"c{i}" for i in range(2, 52)]
    path = tmp_path / "dups.h5ad"
    a.write_h5ad(path)
    return path


def _nan_coordinates(tmp_path: Path) -> Path:
    a = ad.read_h5ad(MERFISH)[:100].copy()
    xy = np.asarray(a.obsm["spatial"], dtype=float)
    xy[3] = np.nan
    a.obsm["spatial"] = xy
    path = tmp_path / "nan.h5ad"
    a.write_h5ad(path)
    return path


def _not_h5ad(tmp_path: Path) -> Path:
    path = tmp_path / "x.h5ad"
    path.write_text("not an h5ad")
    return path


@pytest.mark.parametrize(
    "sample_id, make, message",
    [
        ("../s1", None, "invalid sample id '../s1'"),
        ("s,1", None, "contains a comma"),
        ("s1", _no_coordinates, "no coordinates"),
        ("s1", _duplicate_cells, "duplicate cell ids"),
        ("s1", _nan_coordinates, "NaN/infinite coordinates"),
        ("s1", _not_h5ad, "cannot read it as an .h5ad sample"),
        ("s1", lambda tmp: tmp / "missing.h5ad", "cannot read it as an .h5ad sample"),
    ],
)
def test_bad_input_exits_2_and_lands_nothing(s3_deployment, small_sample, tmp_path, capsys, sample_id, make, message):
    path = make(tmp_path) if make else small_sample
    assert _land("--id", sample_id, path) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert s3_deployment.list("landing/") == []


MERSCOPE = DATA / "raw" / "merscope_mouse_brain_mini"


@pytest.mark.parametrize("deployment", ["s3_deployment", "local_deployment"])
def test_sample_land_uploads_a_raw_instrument_folder_as_is(deployment, request, capsys):
    store = request.getfixturevalue(deployment)
    assert _land("--id", "m1", MERSCOPE) == 0
    out = capsys.readouterr().out
    local = sorted(p.relative_to(MERSCOPE).as_posix() for p in MERSCOPE.rglob("*") if p.is_file())
    assert "landed raw sample 'm1'" in out and "merscope folder" in out and f"{len(local)} files" in out, out
    assert "vendor cells: yes" in out and "transcripts" in out
    (landed,), problems = scan_landing(store, LANDING_PREFIX)
    assert problems == [] and landed.sample_id == "m1" and landed.kind == "raw" and landed.platform == "merscope"
    assert [rel for rel, *_ in landed.raw_files] == local
    for rel in local:
        assert store.read_bytes(f"landing/samples/m1/{rel}") == (MERSCOPE / rel).read_bytes()


def test_relanding_a_folder_needs_replace_and_drops_files_it_no_longer_has(local_deployment, tmp_path, capsys):
    store = local_deployment
    assert _land("--id", "m1", MERSCOPE) == 0
    smaller = tmp_path / "smaller"
    shutil.copytree(MERSCOPE, smaller)
    (smaller / "cell_boundaries.parquet").unlink()  # the vendor's cells gone: watershed by default
    capsys.readouterr()
    assert _land("--id", "m1", smaller) == 2
    assert "'m1' has already landed" in capsys.readouterr().err
    assert store.exists("landing/samples/m1/cell_boundaries.parquet")
    assert _land("--id", "m1", smaller, "--replace") == 0
    assert "replaced raw sample 'm1'" in capsys.readouterr().out
    assert not store.exists("landing/samples/m1/cell_boundaries.parquet")
    (landed,), _ = scan_landing(store, LANDING_PREFIX)
    assert sorted(rel for rel, *_ in landed.raw_files) == sorted(p.relative_to(smaller).as_posix() for p in smaller.rglob("*") if p.is_file())


def _unknown_folder(tmp: Path) -> Path:
    folder = tmp / "unknown"
    folder.mkdir()
    (folder / "notes.txt").write_text("no instrument here")
    return folder


def _empty_transcripts(tmp: Path) -> Path:
    folder = tmp / "empty"
    shutil.copytree(MERSCOPE, folder)
    (folder / "detected_transcripts.csv").write_text(",gene,global_x,global_y,global_z\n")
    return folder


def _no_transform(tmp: Path) -> Path:
    folder = tmp / "no_transform"
    shutil.copytree(MERSCOPE, folder)
    (folder / "images" / "micron_to_mosaic_pixel_transform.csv").unlink()
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (_unknown_folder, "no known platform"),
        (_empty_transcripts, "detected_transcripts.csv: the transcript table is empty"),
        (_no_transform, "missing transform file"),
    ],
)
def test_a_bad_raw_folder_exits_2_and_lands_nothing(s3_deployment, tmp_path, capsys, make, message):
    assert _land("--id", "m1", make(tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert s3_deployment.list("landing/") == []
