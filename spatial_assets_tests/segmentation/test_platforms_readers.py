"""Platform detection, readers on the real fixtures, and each bad input's error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spatial_assets.segmentation.errors import SegmentationInputError
from spatial_assets.segmentation.platforms import detect_platform
from spatial_assets.segmentation.readers import read_sample

from .conftest import COSMX, MERSCOPE, XENIUM, copy_fixture


def test_detects_each_fixture():
    assert detect_platform(MERSCOPE) == "merscope"
    assert detect_platform(COSMX) == "cosmx"
    assert detect_platform(XENIUM) == "xenium"


def test_unknown_folder_lists_what_each_platform_needs(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SegmentationInputError) as e:
        detect_platform(tmp_path)
    msg = str(e.value)
    assert "no known platform" in msg and "notes.txt" in msg
    for needed in ("experiment.xenium", "detected_transcripts.csv", "_tx_file.csv", "filtered_feature_bc_matrix.h5"):
        assert needed in msg
    with pytest.raises(SegmentationInputError, match="not a cosmx folder"):
        read_sample(MERSCOPE, "cosmx")


def test_merscope_reader_units_planes_and_vendor():
    s = read_sample(MERSCOPE)
    assert len(s.transcripts) == 80343 and s.transcripts["gene"].nunique() == 559
    assert s.transcripts["transcript_index"].tolist()[:3] == [0, 1, 2]
    assert s.image.channels == ["DAPI", "PolyT"] and s.image.shape == (4143, 4603)
    assert s.image.pixel_size_um == pytest.approx(0.1086, abs=1e-3)
    assert s.meta["z_planes_used"] == [0, 1]
    assert sorted(s.vendor.per_plane) == [0, 1] and len(s.vendor.per_plane[0]) == 498
    # every transcript lies on the image after the vendor transform
    col, row = s.image.to_pixels(s.transcripts["x"].to_numpy(), s.transcripts["y"].to_numpy())
    assert col.min() > -2 and row.min() > -2 and col.max() < 4603 + 2 and row.max() < 4143 + 2
    assert read_sample(MERSCOPE, z=1).meta["z_planes_used"] == [1]
    with pytest.raises(SegmentationInputError, match="mosaic_DAPI_z5"):
        read_sample(MERSCOPE, z=5)


def test_cosmx_reader_maps_transcripts_onto_the_vendor_mask():
    s = read_sample(COSMX)
    assert s.meta["fov"] == 2 and s.image.channels == ["R", "G", "B"] and s.image.nuclear_channel == "B"
    import tifffile

    mask = tifffile.imread(COSMX / "CellLabels" / "CellLabels_F002.tif")
    col, row = s.image.to_pixels(s.transcripts["x"].to_numpy(), s.transcripts["y"].to_numpy())
    r = np.clip(row.astype(int), 0, mask.shape[0] - 1)
    c = np.clip(col.astype(int), 0, mask.shape[1] - 1)
    vendor = s.transcripts["vendor_cell_id"]
    on = vendor.notna().to_numpy()
    label = mask[r, c].astype(int)
    agree = np.array([f"2_{v}" for v in label[on]]) == vendor[on].to_numpy()
    assert agree.mean() > 0.98  # the README's 98.9 %
    assert len(s.vendor.boundaries) == 67


def test_xenium_reader_without_image_or_cells_zarr():
    s = read_sample(XENIUM)
    assert s.image is None and s.vendor.table.shape == (6, 4)
    assert list(s.vendor.boundaries.index) == ["1", "2", "3", "4", "5", "6"]
    assert s.transcripts["vendor_cell_id"].tolist() == ["2", "2", "2"]
    from spatial_assets.segmentation.pipeline import segment

    with pytest.raises(SegmentationInputError, match="missing image file.*morphology"):
        segment(s, "watershed")


def test_missing_transform_file(tmp_path):
    d = copy_fixture(MERSCOPE, tmp_path)
    (d / "images" / "micron_to_mosaic_pixel_transform.csv").unlink()
    with pytest.raises(SegmentationInputError, match="missing transform file.*micron_to_mosaic_pixel_transform.csv"):
        read_sample(d)


def test_transcripts_outside_the_image(tmp_path):
    d = copy_fixture(MERSCOPE, tmp_path)
    A = np.loadtxt(d / "images" / "micron_to_mosaic_pixel_transform.csv")
    A[0, 2] += 2000  # shift the image by 2000 px: most transcripts fall off it
    np.savetxt(d / "images" / "micron_to_mosaic_pixel_transform.csv", A, delimiter=" ")
    with pytest.raises(SegmentationInputError, match="detected_transcripts.csv: .* lie outside the image .*mosaic_DAPI_z0.tif"):
        read_sample(d)


def test_empty_transcript_tables(tmp_path):
    d = copy_fixture(MERSCOPE, tmp_path)
    (d / "detected_transcripts.csv").write_text(",gene,global_x,global_y,global_z\n")
    with pytest.raises(SegmentationInputError, match="detected_transcripts.csv: the transcript table is empty"):
        read_sample(d)
    c = copy_fixture(COSMX, tmp_path)
    head = (c / "Lung12_tx_file.csv").read_text().splitlines()[0]
    (c / "Lung12_tx_file.csv").write_text(head + "\n")
    with pytest.raises(SegmentationInputError, match="Lung12_tx_file.csv: the transcript table is empty"):
        read_sample(c)


def test_unreadable_tiff(tmp_path):
    d = copy_fixture(MERSCOPE, tmp_path)
    (d / "images" / "mosaic_DAPI_z1.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(SegmentationInputError, match="mosaic_DAPI_z1.tif: unreadable TIFF"):
        read_sample(d)


def test_cosmx_fov_missing_from_positions(tmp_path):
    d = copy_fixture(COSMX, tmp_path)
    (d / "Lung12_fov_positions_file.csv").write_text("fov,x_global_px,y_global_px\n7,0,0\n")
    with pytest.raises(SegmentationInputError, match="Lung12_fov_positions_file.csv: FOV 2 .* not in the positions file"):
        read_sample(d)


def test_missing_coordinates_name_the_file(tmp_path):
    d = copy_fixture(MERSCOPE, tmp_path)
    df = pd.read_csv(d / "detected_transcripts.csv").drop(columns=["global_y"])
    df.to_csv(d / "detected_transcripts.csv", index=False)
    with pytest.raises(SegmentationInputError, match="detected_transcripts.csv: needs columns"):
        read_sample(d)
