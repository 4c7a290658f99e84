"""Raw instrument folders on the platform (no Dagster): fingerprint, segment, QC, and their lineage.

A sample that lands as an instrument output folder (``<landing prefix><id>/``) goes through three
steps, each an asset: ``raw_sample`` (:func:`describe_raw_sample`: the folder read with its
platform's reader — which refuses a bad folder with an error naming the file — and every file
fingerprinted: sha256, ETag, size), ``segmented_cells`` (:func:`segment_raw_sample`: the bytes
verified against that record, then :func:`spatial_assets.segmentation.pipeline.segment`) and
``cell_qc`` (:func:`qc_raw_sample`). Readers need real files (tifffile, h5py, parquet), so every
step stages the folder into a local temporary directory through the store's download cache
(ETag-keyed: the second step reads local copies).

Lineage travels in ``uns``: ``uns['raw_sample']`` (the folder, its platform and every file's
sha256 / ETag / size / URI) and ``uns['segmentation']`` (method, parameters, versions, and
``cells_sha256``, the content hash of the segmented cells) ride from the segmented cells through
QC and ``spatial_cells`` into the annotations' provenance, where ``spatial-assets audit`` compares
them with storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from spatial_assets.core.lineage import content_hash
from spatial_assets.platform.registry import RAW, LandedSample, named_in_storage
from spatial_assets.segmentation.errors import SegmentationInputError
from spatial_assets.segmentation.qc import QCFilters, QCLimits

RAW_UNS = "raw_sample"
SEGMENTATION_UNS = "segmentation"  # = pipeline.SEGMENTATION_UNS (not imported: keeps sopa out of the sensor's imports)
QC_UNS = "cell_qc"


class RawSampleError(ValueError):
    """A landed sample that is not a raw folder where one is needed (names the sample and its files)."""


class StaleRawSampleError(ValueError):
    """A raw file changed since ``raw_sample`` recorded it (names the file and both hashes)."""


class RawSettings(Protocol):
    segmentation_method: str
    segmentation_expand_um: Optional[float]
    segmentation_z: str
    segmentation_weights_dir: str
    qc_min_counts: int
    qc_min_genes: int
    qc_max_control_fraction: float
    qc_min_area_um2: Optional[float]
    qc_max_area_um2: Optional[float]
    qc_max_mt_fraction: Optional[float]
    qc_island_min_size: int
    qc_exclude_islands: bool
    qc_warn_control_fraction: float
    qc_warn_assigned_fraction: float


def qc_filters(settings: RawSettings) -> QCFilters:
    return QCFilters(
        min_counts=int(settings.qc_min_counts),
        min_genes=int(settings.qc_min_genes),
        max_control_fraction=float(settings.qc_max_control_fraction),
        min_area_um2=settings.qc_min_area_um2,
        max_area_um2=settings.qc_max_area_um2,
        max_mt_fraction=settings.qc_max_mt_fraction,
        island_min_size=int(settings.qc_island_min_size),
        exclude_islands=bool(settings.qc_exclude_islands),
    )


def qc_limits(settings: RawSettings) -> QCLimits:
    return QCLimits(
        max_control_fraction=float(settings.qc_warn_control_fraction),
        min_assigned_fraction=float(settings.qc_warn_assigned_fraction),
    )


def segmentation_settings(settings: RawSettings) -> dict[str, Any]:
    """What the settings ask of the segmentation (recorded with the result)."""
    return {
        "method": settings.segmentation_method or "auto (vendor where the folder has it, else watershed)",
        "z": str(settings.segmentation_z),
        "expand_um": "method default" if settings.segmentation_expand_um is None else float(settings.segmentation_expand_um),
        "weights_dir": settings.segmentation_weights_dir or "",
    }


# -------------------------------------------------------------------------------------------- staging


def stage_folder(store: Any, files: Iterable[tuple[str, str]], dest: str | Path) -> Path:
    """The raw folder ``[(relative path, store key)]`` as real files under ``dest`` (via the download cache)."""
    from spatial_assets.segmentation.fingerprint import stage_files

    return stage_files([(rel, store.get_file(key)) for rel, key in files], dest)


def describe_raw_sample(
    store: Any,
    landed: LandedSample,
    *,
    z: str = "all",
    workdir: str | Path,
    method: str | None = None,
    weights_dir: str | None = None,
) -> dict[str, Any]:
    """Read a landed raw folder as the segmentation will, and record what it is (the ``raw_sample`` record).

    The folder is staged locally, its platform detected from its files and read with that platform's
    reader, so a folder of no known platform, a missing image or transform, an empty transcript table
    or an unreadable TIFF fails here with the reader's message (naming the file) and nothing is
    recorded. Every file is fingerprinted: sha256 (of the bytes read), ETag and size (of the listing).
    The segmentation ``method`` the settings ask for (None: the sample's default, vendor where the
    folder has the instrument's cells, else watershed) is checked here too (:func:`check_method_for`):
    a missing binary / weights directory or a missing image fails before anything is stored.
    """
    from spatial_assets.segmentation.fingerprint import fingerprint_files
    from spatial_assets.segmentation.platforms import detect_platform
    from spatial_assets.segmentation.readers import read_sample

    if landed.kind != RAW or landed.folder is None:
        raise RawSampleError(
            f"sample {landed.sample_id!r} landed as a cell-level h5ad ({', '.join(landed.keys)}), not as a raw "
            "instrument folder: spatial_cells reads it directly, there is nothing to segment"
        )
    files = landed.raw_files
    landing_uri = store.uri(landed.folder.rstrip("/")) + "/"
    if not files:
        raise SegmentationInputError(f"{landing_uri}: the raw folder is empty")
    folder = stage_folder(store, [(rel, key) for rel, key, _, _ in files], Path(workdir) / "raw")
    with named_in_storage(folder, landing_uri):
        platform = detect_platform(folder)
        sample = read_sample(folder, platform, z=z)
        resolved = check_method_for(sample, method, weights_dir=weights_dir)
    sums = fingerprint_files(folder, [rel for rel, *_ in files])
    changed = [rel for rel, _, _, size in files if sums[rel]["size"] != size]
    if changed:
        raise StaleRawSampleError(
            f"{landing_uri}: {changed[:5]} changed while being read (size differs from the listing); "
            "the landing sensor will run the sample again on the new files"
        )
    record_files = {
        rel: {"sha256": sums[rel]["sha256"], "etag": etag, "size": int(size), "key": key, "uri": store.uri(key)}
        for rel, key, etag, size in files
    }
    image = sample.image
    return {
        "sample_id": landed.sample_id,
        "landing_uri": landing_uri,
        "folder_key": landed.folder,
        "landing_fingerprint": landed.fingerprint,
        "platform": platform,
        "files": record_files,
        "n_files": len(record_files),
        "n_bytes": int(sum(f["size"] for f in record_files.values())),
        "reader_files": list(sample.files),
        "n_transcripts": int(len(sample.transcripts)),
        "n_genes": int(len(sample.genes)),
        "image": None if image is None else {
            "shape": [int(v) for v in image.shape], "channels": list(image.channels),
            "pixel_size_um": float(image.pixel_size_um), "files": list(image.files),
        },
        "vendor_cells": None if sample.vendor is None else sample.vendor.source,
        "z": str(z),
        "method": resolved,
    }


def check_method_for(sample: Any, method: str | None, *, weights_dir: str | None = None) -> str:
    """The method that will segment ``sample`` (``method`` or the sample's default), after checking it can:
    its binary / package / weights are here (:func:`~spatial_assets.segmentation.methods.check_method_available`),
    ``vendor`` only where the folder has the instrument's cells, and an image for every other method.
    Raises :class:`SegmentationInputError` (naming the folder and the files expected) otherwise."""
    from spatial_assets.segmentation.methods import check_method_available, default_method

    resolved = method or default_method(sample)
    check_method_available(resolved, weights_dir=weights_dir)
    if resolved == "vendor" and sample.vendor is None:
        raise SegmentationInputError(
            f"{sample.folder}: method 'vendor' but the folder has no segmentation of the instrument "
            "(set segmentation_method to watershed or another method)"
        )
    if resolved != "vendor":
        sample.require_image(f"--method {resolved}")
    return resolved


def _verified_folder(store: Any, record: dict[str, Any], workdir: str | Path) -> Path:
    """Stage the recorded files and check each one's sha256 against the record (as references are)."""
    from spatial_assets.segmentation.fingerprint import fingerprint_files

    files = record["files"]
    folder = stage_folder(store, [(rel, f["key"]) for rel, f in sorted(files.items())], Path(workdir) / "raw")
    sums = fingerprint_files(folder, sorted(files))
    for rel, f in sorted(files.items()):
        if sums[rel]["sha256"] != f["sha256"]:
            raise StaleRawSampleError(
                f"raw sample {record['sample_id']!r}: {f['uri']} changed since raw_sample recorded it "
                f"(sha256 {sums[rel]['sha256'][:12]}… ≠ recorded {f['sha256'][:12]}…); re-materialize "
                f"raw_sample[{record['sample_id']}] (the landing sensor does so when it sees the change)"
            )
    return folder


def read_recorded_sample(store: Any, record: dict[str, Any], *, z: str, workdir: str | Path) -> Any:
    """The :class:`~spatial_assets.segmentation.sample.RawSample` of a recorded raw folder (bytes verified)."""
    from spatial_assets.segmentation.readers import read_sample

    folder = _verified_folder(store, record, workdir)
    with named_in_storage(folder, record["landing_uri"]):
        return read_sample(folder, record["platform"], z=z)


def raw_lineage(record: dict[str, Any]) -> dict[str, Any]:
    """``uns['raw_sample']``: the record's lineage in an h5ad-writable shape (parallel lists per file:
    file paths hold '/', which h5ad group names cannot)."""
    paths = sorted(record["files"])
    files = record["files"]
    return {
        "sample_id": record["sample_id"],
        "landing_uri": record["landing_uri"],
        "landing_fingerprint": record["landing_fingerprint"],
        "platform": record["platform"],
        "files": {
            "path": paths,
            "uri": [files[p]["uri"] for p in paths],
            "sha256": [files[p]["sha256"] for p in paths],
            "etag": [files[p]["etag"] for p in paths],
            "size": [int(files[p]["size"]) for p in paths],
        },
    }


def lineage_files(lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-file rows of a :func:`raw_lineage` (from uns or from the provenance), one dict per file."""
    f = lineage.get("files") or {}
    cols = {k: list(np.asarray(v).tolist()) if not isinstance(v, list) else v for k, v in f.items()}
    n = len(cols.get("path", []))
    return [{k: cols[k][i] for k in cols if len(cols[k]) == n} for i in range(n)]


# --------------------------------------------------------------------------------------- segmentation


def segment_raw_sample(store: Any, record: dict[str, Any], settings: RawSettings, *, workdir: str | Path,
                       progress: Any = None) -> Any:
    """Segment a recorded raw folder (bytes verified first) with the settings' method → SegmentationResult.

    ``cells.uns`` gets ``raw_sample`` (lineage), the settings in ``segmentation['settings']`` and
    ``segmentation['cells_sha256']`` (content hash of the segmented cells: what the audit compares).
    """
    from spatial_assets.segmentation.pipeline import segment

    sample = read_recorded_sample(store, record, z=settings.segmentation_z, workdir=workdir)
    with named_in_storage(Path(sample.folder), record["landing_uri"]):
        result = segment(
            sample,
            settings.segmentation_method or None,
            expand_um=settings.segmentation_expand_um,
            weights_dir=settings.segmentation_weights_dir or None,
            progress=progress,
        )
    cells = result.cells
    cells.uns[RAW_UNS] = raw_lineage(record)
    seg = dict(cells.uns[SEGMENTATION_UNS])
    seg["settings"] = segmentation_settings(settings)
    seg["cells_sha256"] = content_hash(cells)
    cells.uns[SEGMENTATION_UNS] = seg
    n_outlines = len(result.boundaries)
    result.boundaries = boundaries_table(result.boundaries, cells.obs_names)
    result.summary["outlines_without_transcripts"] = int(n_outlines - len(result.boundaries))
    return result


def boundaries_table(boundaries: Any, cell_ids: Iterable[str] | None = None) -> Any:
    """Cell outlines as stored (GeoParquet): a ``cell_id`` column (= obs names) and the polygon in µm.

    ``cell_ids``: keep only the outlines of these cells, in this order — a vendor's outline that holds
    no transcript is not a cell of the table (MERSCOPE crop: 505 outlines, 481 cells), and the stored
    outlines must name exactly the cells of ``segmented_cells``.
    """
    import geopandas as gpd

    b = boundaries.copy() if len(boundaries) else gpd.GeoDataFrame({"geometry": []}, geometry="geometry")
    b.index = b.index.astype(str)
    if cell_ids is not None:
        ids = [str(c) for c in cell_ids]
        b = b[b.index.isin(set(ids))]
        b = b.loc[[c for c in ids if c in b.index]]
    b.index.name = "cell_id"
    return gpd.GeoDataFrame(b.reset_index()[["cell_id", "geometry"]], geometry="geometry", crs=b.crs)


# ------------------------------------------------------------------------------------------------ QC


def qc_raw_sample(segmented: Any, settings: RawSettings) -> tuple[Any, dict[str, Any]]:
    """QC columns, filters of the settings applied: (passing cells, report). Lineage ``uns`` kept."""
    from spatial_assets.segmentation.qc import cell_qc

    return cell_qc(segmented, qc_filters(settings))


def qc_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The part of a QC report the provenance keeps."""
    keep = ("n_cells_in", "n_cells_out", "control_fraction", "assigned_fraction", "median_counts", "median_genes")
    out = {k: report[k] for k in keep if report.get(k) is not None}
    out["filters"] = {k: v for k, v in dict(report.get("filters") or {}).items() if v is not None}
    return out


def lineage_of(spatial: Any) -> dict[str, Any] | None:
    """``{raw, segmentation, cell_qc}`` for a sample that came from a raw folder (None otherwise):
    the provenance sections the annotations carry."""
    raw = spatial.uns.get(RAW_UNS)
    if raw is None:
        return None
    seg = dict(spatial.uns.get(SEGMENTATION_UNS) or {})
    segmentation = {k: seg[k] for k in ("platform", "method", "parameters", "versions", "settings", "cells_sha256",
                                         "assigned_fraction", "n_transcripts_total") if k in seg}
    qc = spatial.uns.get(QC_UNS) or {}
    return _builtin({"raw": dict(raw), "segmentation": segmentation, "cell_qc": qc_summary(dict(qc)) if qc else {}})


def _builtin(value: Any) -> Any:
    """Plain Python values (an h5ad read back gives numpy arrays and scalars; metadata needs JSON)."""
    if isinstance(value, dict):
        return {str(k): _builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_builtin(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        return value.item()
    return value


__all__ = [
    "QC_UNS",
    "RAW_UNS",
    "RawSampleError",
    "StaleRawSampleError",
    "boundaries_table",
    "check_method_for",
    "describe_raw_sample",
    "lineage_files",
    "lineage_of",
    "qc_filters",
    "qc_limits",
    "qc_raw_sample",
    "raw_lineage",
    "read_recorded_sample",
    "segment_raw_sample",
    "segmentation_settings",
]
