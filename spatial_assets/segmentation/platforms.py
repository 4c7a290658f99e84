"""Which instrument wrote a raw folder, decided from the files it holds.

Each platform is recognised by one marker file; what else it needs is checked by its reader, so a
folder with the marker but a missing image or transform gets an error naming that file rather than
"unknown platform". A folder with no marker gets an error listing every platform's files.
"""

from __future__ import annotations

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


def _markers(folder: Path) -> dict[str, bool]:
    return {
        "xenium": (folder / "experiment.xenium").is_file(),
        "merscope": (folder / "detected_transcripts.csv").is_file(),
        "cosmx": any(folder.glob("*_tx_file.csv")) or any(folder.glob("*_tx_file.csv.gz")),
        "visium_hd": (folder / "binned_outputs").is_dir(),
    }


def requirements_text() -> str:
    return "; ".join(f"{p}: " + ", ".join(req) for p, req in REQUIREMENTS.items())


def detect_platform(folder: str | Path) -> str:
    """``'xenium' | 'merscope' | 'cosmx' | 'visium_hd'`` from the marker files in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegmentationInputError(f"{folder}: not a directory")
    found = [p for p, ok in _markers(folder).items() if ok]
    if not found:
        present = sorted(str(p.relative_to(folder)) for p in folder.iterdir())[:12]
        raise SegmentationInputError(
            f"{folder}: no known platform (files present: {present}). Each platform needs: {requirements_text()}"
        )
    if len(found) > 1:
        raise SegmentationInputError(f"{folder}: files of several platforms ({', '.join(found)}); pass --platform")
    return found[0]


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


__all__ = ["PLATFORMS", "REQUIREMENTS", "check_platform", "detect_platform", "requirements_text"]
