"""What the settings choose for a raw sample: the segmentation method, and the QC check's ERROR / WARN.

The raw assets and their checks are materialized for one partition on local storage (the S3 flow,
by the sensors, is in ``test_segmentation_platform``), with the real MERSCOPE crop landed as a folder
the way ``spatial-assets sample land`` lands it. Expected values come from the segmentation package
run on the local copy of the folder, not written down.
"""

import shutil
import warnings
from pathlib import Path

import anndata as ad
import dagster as dg
import numpy as np
import pytest

from spatial_assets.defs.io_managers import LocalAssetIOManager
from spatial_assets.defs.resources import LocalStorageResource
from spatial_assets.defs.segmentation.assets import cell_qc, raw_sample, segmented_cells
from spatial_assets.defs.segmentation.checks import cell_qc_fractions, cell_qc_invariants
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.registry import land_sample
from spatial_assets.segmentation.pipeline import segment
from spatial_assets.segmentation.qc import QCFilters, QCLimits
from spatial_assets.segmentation.qc import cell_qc as run_cell_qc
from spatial_assets.segmentation.readers import read_sample

warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)

MERSCOPE = Path(__file__).resolve().parents[2] / "data" / "raw" / "merscope_mouse_brain_mini"
RAW = [raw_sample, segmented_cells, cell_qc, cell_qc_invariants, cell_qc_fractions]


class Local:
    def __init__(self, root: Path, instance: dg.DagsterInstance):
        self.root, self.instance = root, instance
        self.storage = LocalStorageResource(root=str(root))
        self.store = self.storage.get_store()
        self.io = LocalAssetIOManager(base_dir=str(root / "assets"))

    def land(self, sample_id: str, folder: Path = MERSCOPE) -> None:
        land_sample(self.store, sample_id, str(folder))
        self.instance.add_dynamic_partitions("samples", [sample_id])

    def run(self, sample_id: str, settings: PlatformSettings) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            RAW,
            partition_key=sample_id,
            resources={"storage": self.storage, "io_manager": self.io, "settings": settings},
            instance=self.instance,
            raise_on_error=False,
        )

    def written(self, sample_id: str) -> list[str]:
        return sorted(o.key for o in self.store.list("assets/") if o.key.count("/") >= 2 and o.key.split("/")[2].startswith(sample_id))


@pytest.fixture
def local(tmp_path):
    with dg.instance_for_test() as instance:
        yield Local(tmp_path / "store", instance)


def _failure(result: dg.ExecuteInProcessResult) -> str:
    return " ".join(str(e.event_specific_data.error) for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_watershed_chosen_by_settings_on_a_folder_with_vendor_cells(local):
    local.land("ws")
    result = local.run("ws", PlatformSettings(segmentation_method="watershed"))
    assert result.success, _failure(result)
    expected = segment(read_sample(MERSCOPE), "watershed")
    cells = ad.read_h5ad(local.store.get_file("assets/segmented_cells/ws.h5ad"))
    assert cells.uns["segmentation"]["method"] == "watershed" and cells.uns["segmentation"]["platform"] == "merscope"
    assert cells.uns["segmentation"]["settings"]["method"] == "watershed"
    assert list(cells.obs_names) == list(expected.cells.obs_names)
    assert (cells.X != expected.cells.X).nnz == 0
    # the vendor's 481 cells are not what was stored: a different segmentation, its own outlines
    vendor = segment(read_sample(MERSCOPE))
    assert cells.n_obs != vendor.cells.n_obs
    meta = result.asset_materializations_for_node("raw_sample")[0].metadata
    assert meta["segmentation_method"].value == "watershed"
    qc = ad.read_h5ad(local.store.get_file("assets/cell_qc/ws.h5ad"))
    _, report = run_cell_qc(expected.cells, QCFilters())
    assert qc.n_obs == report["n_cells_out"]


@pytest.mark.parametrize(
    ("method", "message"),
    [("proseg", "the 'proseg' binary is not on PATH"), ("baysor", "the 'baysor' binary is not on PATH"),
     ("stardist", "--method stardist:"), ("cellpose", "--method cellpose:")],
)
def test_a_method_that_cannot_run_here_fails_the_sample_before_anything_is_stored(local, method, message):
    local.land("m")
    result = local.run("m", PlatformSettings(segmentation_method=method))
    assert not result.success
    error = _failure(result)
    assert message in error and ("never downloaded" in error or "not installed" in error), error
    assert local.written("m") == []


def test_a_method_that_needs_an_image_fails_on_a_folder_without_one(local, tmp_path):
    folder = tmp_path / "no_images"
    shutil.copytree(MERSCOPE, folder, ignore=shutil.ignore_patterns("images"))
    local.land("noimg", folder)
    # the vendor's cells need no image: the default method runs
    ok = local.run("noimg", PlatformSettings())
    assert ok.success, _failure(ok)
    assert ad.read_h5ad(local.store.get_file("assets/segmented_cells/noimg.h5ad")).uns["segmentation"]["method"] == "vendor"
    for key in local.written("noimg"):
        local.store.delete(key)
    bad = local.run("noimg", PlatformSettings(segmentation_method="watershed"))
    assert not bad.success
    error = _failure(bad)
    assert "missing image file" in error and "images/mosaic_DAPI_z<N>.tif" in error and "--method watershed" in error, error
    assert str(local.root / "landing" / "samples" / "noimg") in error, error  # the landed folder, not a temp copy
    assert local.written("noimg") == []


def test_qc_fractions_warn_above_the_settings_limits_and_do_not_block(local):
    local.land("warn")
    expected = segment(read_sample(MERSCOPE))
    qc, report = run_cell_qc(expected.cells, QCFilters())
    af, cf = expected.summary["assigned_fraction"], report["control_fraction"]
    # limits just beyond the sample's own values: both fractions out of bounds
    settings = PlatformSettings(qc_warn_assigned_fraction=min(1.0, af + 0.05), qc_warn_control_fraction=max(0.0, cf / 2))
    result = local.run("warn", settings)
    assert result.success  # a WARN does not fail the run
    checks = _checks(result)
    warn = checks["cell_qc_fractions"]
    assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN
    assert warn.metadata["assigned_fraction"].value == pytest.approx(af)
    assert warn.metadata["control_fraction"].value == pytest.approx(cf)
    assert warn.metadata["assigned_fraction_ok"].value is False and warn.metadata["control_fraction_ok"].value is False
    assert "of transcripts assigned to cells" in warn.description and "control-probe fraction" in warn.description
    assert checks["cell_qc_invariants"].passed
    # the default limits: the same sample passes both
    assert QCLimits().min_assigned_fraction <= af and cf <= QCLimits().max_control_fraction
    ok = _checks(local.run("warn", PlatformSettings()))
    assert ok["cell_qc_fractions"].passed and ok["cell_qc_invariants"].passed


def test_qc_filters_that_leave_no_cell_are_an_error(local):
    local.land("none")
    result = local.run("none", PlatformSettings(qc_min_counts=10**9))
    checks = _checks(result)
    error = checks["cell_qc_invariants"]
    assert not error.passed and error.severity == dg.AssetCheckSeverity.ERROR
    assert error.metadata["cells_left"].value == 0 and "0 cells after filtering" in error.description
    assert ad.read_h5ad(local.store.get_file("assets/cell_qc/none.h5ad")).n_obs == 0


def test_an_empty_cell_after_filtering_is_an_error():
    """A cell with no panel transcript that reached the QC'd cells: the blocking check refuses it."""
    qc, _ = run_cell_qc(segment(read_sample(MERSCOPE)).cells, QCFilters())
    assert cell_qc_invariants(cell_qc=qc, settings=PlatformSettings()).passed
    X = qc.X.tolil()
    X[0, :] = 0
    qc.X = X.tocsr()
    qc.obs["total_counts"] = np.asarray(qc.X.sum(1)).ravel()
    evaluation = cell_qc_invariants(cell_qc=qc, settings=PlatformSettings())
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["no_empty_cells"].value == 1
    assert "1 cells without panel transcripts after filtering" in evaluation.description
