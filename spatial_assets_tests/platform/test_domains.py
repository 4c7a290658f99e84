"""Islands and the packed domain model as the platform uses them."""

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from spatial_assets.domains.engine import run_domains
from spatial_assets.platform.domains import mark_islands, pack_model, unpack_model
from spatial_assets.platform.validation import check_domains

STARMAP = Path(__file__).resolve().parents[2] / "data" / "mouse_mPFC_STARmap_Wang2018.h5ad"


@pytest.fixture(scope="module")
def slice_with_fragment():
    a = ad.read_h5ad(STARMAP)
    a = a[a.obs["slice"] == a.obs["slice"].unique()[0]].copy()
    xy = np.asarray(a.obsm["spatial"], dtype=float)
    # move 6 cells far away from the section: a detached fragment
    far = np.arange(6)
    xy[far] = xy[:, :2].max(axis=0) * 3 + np.arange(6)[:, None] * 5.0
    a.obsm["spatial"] = xy
    return a, a.obs_names[far]


def test_detached_fragment_is_flagged_and_nothing_else(slice_with_fragment):
    a, fragment = slice_with_fragment
    (out,), _ = run_domains([a], n_domains=4)
    flagged = mark_islands(out, min_size=10)
    islands = set(flagged.obs_names[flagged.obs["is_island"].to_numpy()])
    assert set(fragment) <= islands
    assert len(islands) <= len(fragment) + 10  # the section itself is not broken into islands
    assert flagged.obs["domain"].notna().all()  # kept by default
    assert check_domains(flagged).passed


def test_excluded_islands_have_no_domain_and_pass_the_check(slice_with_fragment):
    a, fragment = slice_with_fragment
    (out,), _ = run_domains([a], n_domains=4)
    excluded = mark_islands(out, min_size=10, exclude=True)
    assert excluded.obs.loc[fragment, "domain"].isna().all()
    assert excluded.obs.loc[fragment, "domain_level_4"].isna().all()
    report = check_domains(excluded)
    assert report.passed, report.summary
    # a missing domain on a cell that is not an island is a failure
    broken = excluded.copy()
    values = broken.obs["domain"].copy()
    values.iloc[-1] = None
    broken.obs["domain"] = values
    broken.obs.loc[broken.obs_names[-1], "is_island"] = False
    assert not check_domains(broken).passed


def test_packed_model_round_trip_and_tamper(tmp_path, slice_with_fragment):
    a, _ = slice_with_fragment
    outs, model = run_domains([a], n_domains=4)
    archive = tmp_path / "model.zip"
    sha = pack_model(model, archive)
    assert pack_model(model, tmp_path / "again.zip") == sha  # deterministic bytes
    again = unpack_model(archive, sha).assign(a)
    assert (again.obs["domain"].astype(str) == outs[0].obs["domain"].astype(str)).all()
    archive.write_bytes(archive.read_bytes() + b"x")
    with pytest.raises(ValueError, match="sha256"):
        unpack_model(archive, sha)
