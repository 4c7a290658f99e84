"""The landing listing tells a raw instrument folder from a cell-level h5ad, with no download.

Each real folder of ``data/raw`` (Xenium, MERSCOPE, CosMx) is put under the landing prefix of a
local store file by file; the listing alone must give the platform the readers' ``detect_platform``
gives on the folder itself.
"""

from pathlib import Path

import pytest

from spatial_assets.platform.registry import CELLS, LANDING_PREFIX, RAW, scan_landing
from spatial_assets.segmentation.errors import SegmentationInputError
from spatial_assets.segmentation.platforms import detect_platform, detect_platform_from_keys
from spatial_assets.storage.stores import LocalStore

RAW_DATA = Path(__file__).resolve().parents[2] / "data" / "raw"
FOLDERS = sorted(p for p in RAW_DATA.iterdir() if p.is_dir())


def _put_folder(store: LocalStore, folder: Path, sample_id: str) -> list[str]:
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for rel in rels:
        store.put_file(folder / rel, f"{LANDING_PREFIX}{sample_id}/{rel}")
    return rels


def test_the_bundled_folders_cover_three_platforms():
    assert sorted(detect_platform(f) for f in FOLDERS) == ["cosmx", "merscope", "xenium"]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_a_landed_folder_is_raw_with_the_platform_of_its_files(tmp_path, folder):
    store = LocalStore(tmp_path / "store")
    rels = _put_folder(store, folder, "s1")
    assert detect_platform_from_keys(rels) == detect_platform(folder)
    (landed,), problems = scan_landing(store, LANDING_PREFIX)
    assert problems == [] and landed.sample_id == "s1"
    assert (landed.kind, landed.platform) == (RAW, detect_platform(folder))
    assert landed.folder == f"{LANDING_PREFIX}s1/"
    assert [(rel, size) for rel, _, _, size in landed.raw_files] == [(rel, (folder / rel).stat().st_size) for rel in rels]


def test_h5ad_and_unknown_folders(tmp_path):
    store = LocalStore(tmp_path / "store")
    (tmp_path / "a.h5ad").write_bytes(b"x")
    store.put_file(tmp_path / "a.h5ad", f"{LANDING_PREFIX}cells.h5ad")
    store.put_file(tmp_path / "a.h5ad", f"{LANDING_PREFIX}cells_folder/cells.h5ad")
    store.put_file(tmp_path / "a.h5ad", f"{LANDING_PREFIX}unknown/notes.txt")
    landed = {s.sample_id: s for s in scan_landing(store, LANDING_PREFIX)[0]}
    assert (landed["cells"].kind, landed["cells"].platform, landed["cells"].raw_files) == (CELLS, None, [])
    assert (landed["cells_folder"].kind, landed["cells_folder"].platform) == (CELLS, None)
    # neither an instrument's files nor an h5ad: a raw sample whose run fails with the readers' message
    assert (landed["unknown"].kind, landed["unknown"].platform) == (RAW, None)
    with pytest.raises(SegmentationInputError, match="no known platform.*Each platform needs: xenium:"):
        detect_platform_from_keys(["notes.txt"], where="s3://b/landing/samples/unknown/")
