"""Shared fixtures: the real raw fixtures in data/raw and a small synthetic MERSCOPE folder."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

RAW = Path(__file__).resolve().parents[2] / "data" / "raw"
MERSCOPE = RAW / "merscope_mouse_brain_mini"
COSMX = RAW / "cosmx_lung_mini"
XENIUM = RAW / "xenium_breast_fixture"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def copy_fixture(src: Path, dest: Path) -> Path:
    out = dest / src.name
    shutil.copytree(src, out)
    for p in out.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return out


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spatial_assets.segmentation.synthetic import SyntheticSpec, write_merscope_sample

    d = tmp_path_factory.mktemp("syn") / "synthetic_merscope"
    write_merscope_sample(d, SyntheticSpec(width_um=140.0, height_um=140.0, seed=11))
    return d
