"""One raw sample as every method sees it: transcripts in µm, lazy images with their pixel → µm map, vendor cells.

Why our own small container instead of handing SpatialData around: the platforms disagree on units
(Xenium µm, CosMx pixels with a flipped y axis, MERSCOPE µm with a separate affine), on how a
transcript names its cell, and on which files exist; every method downstream wants the same thing.
``RawSample.to_spatialdata()`` builds the SpatialData object sopa works on (image with its affine to
µm in the ``global`` coordinate system, transcripts as points in µm) when a method needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spatial_assets.segmentation.errors import SegmentationInputError

#: columns of ``RawSample.transcripts``
TRANSCRIPT_COLUMNS = ("transcript_index", "x", "y", "z", "gene", "vendor_cell_id")


@dataclass
class ImageLayer:
    """A lazily read image (dask array ``(c, y, x)``) and the affine pixel (col, row, 1) → µm (x, y, 1)."""

    data: Any  # dask.array.Array (c, y, x), integer dtype
    channels: list[str]
    pixel_to_um: np.ndarray  # 3x3
    files: list[str]
    nuclear_channel: str
    cytoplasm_channel: str | None = None
    #: 'fluorescence' (nuclei bright in ``nuclear_channel``) or 'he' (RGB H&E: haematoxylin via rgb2hed)
    kind: str = "fluorescence"

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[2])

    @property
    def pixel_size_um(self) -> float:
        return float(np.sqrt(abs(np.linalg.det(self.pixel_to_um[:2, :2]))))

    @property
    def um_to_pixel(self) -> np.ndarray:
        return np.linalg.inv(self.pixel_to_um)

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """µm → (col, row) continuous pixel coordinates (pixel centres at integer + 0.5)."""
        m = self.um_to_pixel
        return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]

    def extent_um(self) -> tuple[float, float, float, float]:
        h, w = self.shape
        corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], float) @ self.pixel_to_um.T
        return float(corners[:, 0].min()), float(corners[:, 1].min()), float(corners[:, 0].max()), float(corners[:, 1].max())

    def read(self, channel: str, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        if channel not in self.channels:
            raise SegmentationInputError(f"{self.files[0]}: no channel {channel!r} (channels: {self.channels})")
        return np.asarray(self.data[self.channels.index(channel), rows, cols])


@dataclass
class VendorCells:
    """The instrument's own segmentation: outlines (µm) and, where the platform writes one, its matrix."""

    boundaries: Any | None  # GeoDataFrame indexed by cell id (µm) or None
    table: Any | None = None  # AnnData (cells x genes raw counts) or None: then built from transcripts
    nuclei: Any | None = None  # GeoDataFrame of nucleus outlines (µm) or None
    obs: pd.DataFrame | None = None  # per-cell metadata (area, nucleus area, ...)
    source: str = ""
    #: MERSCOPE writes one outline per z plane: {plane: GeoDataFrame}
    per_plane: dict[int, Any] | None = None


@dataclass
class RawSample:
    platform: str
    folder: Path
    transcripts: pd.DataFrame  # TRANSCRIPT_COLUMNS (+ platform extras)
    transcripts_file: str
    image: ImageLayer | None
    vendor: VendorCells | None
    files: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def genes(self) -> list[str]:
        return [str(g) for g in self.transcripts["gene"].cat.categories]

    def require_image(self, why: str) -> ImageLayer:
        if self.image is None:
            needs = self.meta.get("image_files_expected", "a morphology image")
            raise SegmentationInputError(f"{self.folder}: missing image file ({needs}), needed by {why}")
        return self.image

    def to_spatialdata(self, *, with_points: bool = True, shapes: dict[str, Any] | None = None):
        """SpatialData with the image (pixels, affine to µm in ``global``), points in µm and optional shapes."""
        from spatialdata import SpatialData
        from spatialdata.models import Image2DModel, PointsModel, ShapesModel
        from spatialdata.transformations import Affine, Identity

        images = {}
        if self.image is not None:
            affine = Affine(self.image.pixel_to_um, input_axes=("x", "y"), output_axes=("x", "y"))
            images["image"] = Image2DModel.parse(
                self.image.data, dims=("c", "y", "x"), c_coords=self.image.channels,
                transformations={"global": affine},
            )
        points = {}
        if with_points:
            df = self.transcripts[["x", "y", "gene", "transcript_index"]].copy()
            df["gene"] = df["gene"].astype(str).astype("category")
            points["transcripts"] = PointsModel.parse(df, feature_key="gene", transformations={"global": Identity()})
        sh = {k: ShapesModel.parse(v, transformations={"global": Identity()}) for k, v in (shapes or {}).items()}
        return SpatialData(images=images, points=points, shapes=sh)


def normalise_transcripts(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Validate and type the common columns; ``transcript_index`` = 0-based row of the input table."""
    if len(df) == 0:
        raise SegmentationInputError(f"{source}: the transcript table is empty")
    for col in ("x", "y", "gene"):
        if col not in df.columns:
            raise SegmentationInputError(f"{source}: no column for {col!r}")
    x = pd.to_numeric(df["x"], errors="coerce").to_numpy(np.float64)
    y = pd.to_numeric(df["y"], errors="coerce").to_numpy(np.float64)
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if bad.any():
        raise SegmentationInputError(f"{source}: {int(bad.sum())} transcripts have missing/non-numeric coordinates (first row {int(np.flatnonzero(bad)[0])})")
    out = pd.DataFrame({
        "transcript_index": np.arange(len(df), dtype=np.int64),
        "x": x,
        "y": y,
        "z": pd.to_numeric(df["z"], errors="coerce").to_numpy(np.float64) if "z" in df.columns else np.zeros(len(df)),
        "gene": pd.Categorical(df["gene"].astype(str)),
        "vendor_cell_id": df["vendor_cell_id"].astype(object).where(df["vendor_cell_id"].notna(), None)
        if "vendor_cell_id" in df.columns else pd.Series([None] * len(df), dtype=object),
    })
    for extra in df.columns:
        if extra not in out.columns and extra not in ("x", "y", "z", "gene", "vendor_cell_id"):
            out[extra] = df[extra].to_numpy()
    return out


def check_inside_image(sample: RawSample, *, tolerance_um: float = 2.0, max_outside: float = 0.001) -> None:
    """Refuse a sample whose transcripts do not lie on its image (a wrong transform or a wrong image)."""
    if sample.image is None:
        return
    col, row = sample.image.to_pixels(sample.transcripts["x"].to_numpy(), sample.transcripts["y"].to_numpy())
    h, w = sample.image.shape
    tol = tolerance_um / sample.image.pixel_size_um
    out = (col < -tol) | (row < -tol) | (col > w + tol) | (row > h + tol)
    if out.mean() > max_outside:
        x0, y0, x1, y1 = sample.image.extent_um()
        raise SegmentationInputError(
            f"{sample.transcripts_file}: {int(out.sum())} of {out.size} transcripts ({out.mean():.1%}) lie outside the image "
            f"{sample.image.files[0]} (image extent x {x0:.1f}–{x1:.1f} µm, y {y0:.1f}–{y1:.1f} µm); "
            "wrong transform or image?"
        )


__all__ = ["ImageLayer", "RawSample", "TRANSCRIPT_COLUMNS", "VendorCells", "check_inside_image", "normalise_transcripts"]
