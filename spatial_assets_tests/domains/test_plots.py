"""Domain figures: each writes a real PNG (checked by header, size and pixel content), atomically,
and refuses inputs it cannot draw with a clear error. Real STARmap data, layers as domains."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import anndata as ad
import matplotlib.image as mpimg
import numpy as np
import pytest

from spatial_assets.domains.annotation import annotate_domains, domain_composition
from spatial_assets.domains.plots import (
    default_level_keys,
    plot_domain_proportions,
    plot_domains,
    plot_elbows,
    plot_islands,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def starmap(load_starmap) -> ad.AnnData:
    """STARmap with stand-ins for engine output; a fresh copy per test."""
    a = load_starmap()
    # stand-ins for engine output: two "levels" with engine-style ids
    layer_ids = {lab: f"L4_D{i}" for i, lab in enumerate(sorted(a.obs["layer"].astype(str)))}
    a.obs["domain_level_4"] = a.obs["layer"].astype(str).map(layer_ids).astype("category")
    a.obs["domain_level_15"] = a.obs["cell_type"].astype(str).astype("category")
    a.obs["domain"] = a.obs["domain_level_4"]
    a.obs["sample_id"] = a.obs["slice"].astype(str)
    return a


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC
    return struct.unpack(">II", head[16:24])


def _assert_drawn(path: Path, min_bytes: int = 5_000) -> None:
    assert path.is_file() and path.stat().st_size > min_bytes
    w, h = _png_size(path)
    assert w > 200 and h > 150
    img = mpimg.imread(path)
    # not a blank canvas: a real share of pixels differs from white
    non_white = np.mean(np.any(img[..., :3] < 0.95, axis=-1))
    assert non_white > 0.02
    assert not list(path.parent.glob(f".{path.stem}.*"))  # no temp file left behind


def test_default_level_keys_order(starmap: ad.AnnData) -> None:
    assert default_level_keys(starmap) == ["domain_level_4", "domain_level_15"]
    only_domain = ad.AnnData(obs=starmap.obs[["domain"]].copy())
    assert default_level_keys(only_domain) == ["domain"]


def test_plot_domains_grid(starmap: ad.AnnData, tmp_path: Path) -> None:
    one = plot_domains(starmap, tmp_path / "one.png", level_keys=["domain"])
    grid = plot_domains(starmap, tmp_path / "sub" / "grid.png", sample_key="sample_id")
    _assert_drawn(one)
    _assert_drawn(grid)
    w1, h1 = _png_size(one)
    w2, h2 = _png_size(grid)
    assert w2 > w1 and h2 > 2 * h1  # 3 samples x 2 levels vs 1 x 1


def test_plot_domain_proportions(starmap: ad.AnnData, tmp_path: Path) -> None:
    comp = domain_composition(starmap, domain_key="layer", sample_key="sample_id")
    _assert_drawn(plot_domain_proportions(comp, tmp_path / "props.png"))
    with pytest.raises(ValueError, match="n_cells"):
        plot_domain_proportions(comp.drop(columns="n_cells"), tmp_path / "bad.png")


def test_plot_elbows(starmap: ad.AnnData, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, assignment = annotate_domains(starmap, "mouse_brain", domain_key="layer")
    _assert_drawn(plot_elbows(assignment, tmp_path / "elbows.png"))


def test_plot_islands(starmap: ad.AnnData, tmp_path: Path) -> None:
    a = starmap.copy()
    a.obs["is_island"] = np.arange(a.n_obs) % 50 == 0
    _assert_drawn(plot_islands(a, tmp_path / "islands.png", sample_key="sample_id"))
    with pytest.raises(ValueError, match="'is_island' not found"):
        plot_islands(starmap, tmp_path / "none.png")


def test_bad_inputs_write_nothing(starmap: ad.AnnData, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope"):
        plot_domains(starmap, tmp_path / "x.png", level_keys=["nope"])
    no_xy = starmap.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(ValueError, match="spatial"):
        plot_domains(no_xy, tmp_path / "y.png")
    assert list(tmp_path.iterdir()) == []
