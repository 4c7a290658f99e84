"""Which instrument wrote a raw folder, decided from the files it holds.

Each platform is recognised by one marker file; what else it needs is checked by its reader, so a
folder with the marker but a missing image or transform gets an error naming that file rather than
"unknown platform". A folder with no marker gets an error listing every platform's files.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import Path

from spatial_assets.segmentation.errors import SegmentationInputError

PLATFORMS = ("xenium", "merscope", "cosmx", "visium_hd")

#: what each reader needs (shown when a folder matches no platform); globs are relative to the folder
REQUIREMENTS: dict[str, list[str]] = {
    "xenium": [
        "experiment.xenium",
        "transcripts.parquet",
        "cells.parquet + cell_feature_matrix.h5 + cell_boundaries.parquet (vendor cells)",
        "morphology_focus/*.ome.tif or morphology_focus.ome.tif or morphology_mip.ome.tif (re-segmentation)",
    ],
    "merscope": [
        "detected_transcripts.csv",
        "images/micron_to_mosaic_pixel_transform.csv",
        "images/mosaic_DAPI_z<N>.tif (re-segmentation; other stains optional)",
        "cell_boundaries.parquet (vendor cells)",
    ],
    "cosmx": [
        "<run>_tx_file.csv[.gz]",
        "<run>_fov_positions_file.csv[.gz]",
        "CellComposite/CellComposite_F<fov>.jpg (re-segmentation)",
        "CellLabels/CellLabels_F<fov>.tif (vendor cells; or the transcripts' cell_ID)",
    ],
    "visium_hd": [
        "binned_outputs/square_<NNN>um/filtered_feature_bc_matrix.h5",
        "binned_outputs/square_<NNN>um/spatial/tissue_positions.parquet",
        "binned_outputs/square_<NNN>um/spatial/scalefactors_json.json",
    ],
}


def _markers_from_keys(keys: Iterable[str]) -> dict[str, bool]:
    """Which platforms' marker files a listing holds; ``keys`` are '/'-separated paths relative to the
    folder (a directory may appear as ``name/``). The one set of rules: :func:`detect_platform` applies
    it to a directory's top-level entries, :func:`detect_platform_from_keys` to an object-store listing."""
    top_files: set[str] = set()
    top_dirs: set[str] = set()
    for key in keys:
        key = str(key).replace("\\", "/").lstrip("/")
        head, sep, _ = key.partition("/")
        if sep:
            top_dirs.add(head)
        elif head:
            top_files.add(head)
    return {
        "xenium": "experiment.xenium" in top_files,
        "merscope": "detected_transcripts.csv" in top_files,
        "cosmx": any(fnmatch.fnmatchcase(f, "*_tx_file.csv") or fnmatch.fnmatchcase(f, "*_tx_file.csv.gz") for f in top_files),
        "visium_hd": "binned_outputs" in top_dirs,
    }


def _top_level_keys(folder: Path) -> list[str]:
    """A directory's entries as listing keys: files ``name``, directories ``name/``."""
    return [p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()]


def _markers(folder: Path) -> dict[str, bool]:
    return _markers_from_keys(_top_level_keys(folder))


def requirements_text() -> str:
    return "; ".join(f"{p}: " + ", ".join(req) for p, req in REQUIREMENTS.items())


def _decide(found: list[str], where: str, present: list[str]) -> str:
    if not found:
        raise SegmentationInputError(
            f"{where}: no known platform (files present: {present[:12]}). Each platform needs: {requirements_text()}"
        )
    if len(found) > 1:
        raise SegmentationInputError(f"{where}: files of several platforms ({', '.join(found)}); pass --platform")
    return found[0]


def detect_platform(folder: str | Path) -> str:
    """``'xenium' | 'merscope' | 'cosmx' | 'visium_hd'`` from the marker files in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegmentationInputError(f"{folder}: not a directory")
    found = [p for p, ok in _markers(folder).items() if ok]
    return _decide(found, str(folder), sorted(_top_level_keys(folder)))


def detect_platform_from_keys(keys: Iterable[str], *, where: str = "raw folder") -> str:
    """The platform of a folder known only by its listing (no download): ``keys`` are paths relative to
    the folder, e.g. an object store's keys under ``landing/samples/<id>/``. Same rules and errors as
    :func:`detect_platform`; ``where`` names the folder in them."""
    keys = [str(k) for k in keys]
    found = [p for p, ok in _markers_from_keys(keys).items() if ok]
    present = sorted({k.split("/", 1)[0] + ("/" if "/" in k else "") for k in keys})
    return _decide(found, where, present)


def check_platform(folder: str | Path, platform: str) -> str:
    """Validate an explicit ``platform`` (``'auto'`` detects it)."""
    if platform in (None, "", "auto"):
        return detect_platform(folder)
    if platform not in PLATFORMS:
        raise SegmentationInputError(f"unknown platform {platform!r}; use one of auto, {', '.join(PLATFORMS)}")
    if not Path(folder).is_dir():
        raise SegmentationInputError(f"{folder}: not a directory")
    if not _markers(Path(folder))[platform]:
        raise SegmentationInputError(
            f"{folder}: not a {platform} folder; it needs {', '.join(REQUIREMENTS[platform])}"
        )
    return platform


__all__ = ["PLATFORMS", "REQUIREMENTS", "check_platform", "detect_platform", "detect_platform_from_keys", "requirements_text"]
