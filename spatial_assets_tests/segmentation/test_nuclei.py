"""Nucleus refinements of the watershed: re-split by the image's own nucleus size, convex merge, stain scope."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from spatial_assets.segmentation.nuclei import WatershedParams, merge_convex_pieces, segment_patch, split_large

P = 0.4  # µm per working pixel


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _image_with_pair(single_r: float) -> np.ndarray:
    """One object made of two overlapping disks (r = 9 px, a neck between them) among five others."""
    lab = np.zeros((200, 260), np.int32)
    lab[_disk(lab.shape, 40, 40, 9) | _disk(lab.shape, 40, 55, 9)] = 1
    for k, (cy, cx) in enumerate([(120, 40), (120, 100), (120, 160), (120, 220), (40, 200)], start=2):
        lab[_disk(lab.shape, cy, cx, single_r)] = k
    return lab


def test_split_large_splits_what_is_large_for_this_image():
    params = WatershedParams()
    small_neighbours = _image_with_pair(single_r=9)  # the pair is ~2x the median object here
    out = split_large(small_neighbours, small_neighbours.astype(float), P, params)
    pair = np.unique(out[small_neighbours == 1])
    assert pair.size == 2
    sizes = np.bincount(out[small_neighbours == 1])[pair]
    assert sizes.min() > 0.35 * sizes.sum()  # two halves, not a sliver
    # the other objects are untouched
    assert np.array_equal(out[small_neighbours > 1], small_neighbours[small_neighbours > 1])


def test_split_large_leaves_the_same_object_whole_among_equally_large_ones():
    params = WatershedParams()
    big_neighbours = _image_with_pair(single_r=13)  # the pair is about the median object size here
    out = split_large(big_neighbours, big_neighbours.astype(float), P, params)
    assert np.array_equal(out, big_neighbours)
    assert np.array_equal(split_large(_image_with_pair(9), None, P, replace(params, split_area_ratio=100.0)), _image_with_pair(9))


def test_merge_convex_pieces_rejoins_a_cut_disk_but_not_two_nuclei():
    lab = np.zeros((80, 140), np.int32)
    d = _disk(lab.shape, 40, 30, 15)
    lab[d] = 1
    lab[d & (np.mgrid[:80, :140][1] > 30)] = 2  # one disk cut in two halves
    lab[_disk(lab.shape, 40, 90, 12)] = 3
    lab[_disk(lab.shape, 40, 113, 12) & ~(lab > 0)] = 4  # a second disk touching the third
    out = merge_convex_pieces(lab, 0.9)
    assert np.unique(out[d]).size == 1  # the halves are one nucleus again
    assert out[40, 90] != out[40, 113]  # two touching disks stay two
    assert np.unique(out[out > 0]).size == 3


def test_stained_cells_scope_limits_only_cells_that_take_the_stain():
    shape = (120, 200)
    nuclear = np.zeros(shape, np.float32)
    nuclear[_disk(shape, 60, 50, 8)] = 1000
    nuclear[_disk(shape, 60, 150, 8)] = 1000
    nuclear += np.random.default_rng(0).normal(20, 2, shape).astype(np.float32)
    cyto = np.full(shape, 10, np.float32)
    cyto[_disk(shape, 60, 50, 12)] = 500  # only the left cell takes the stain, 4 px beyond its nucleus
    params = replace(WatershedParams(), expansion="fixed", expand_um=4.0, work_pixel_um=P)
    everywhere, nuc = segment_patch(nuclear, P, params, cytoplasm=cyto, native=False)
    scoped, _ = segment_patch(nuclear, P, replace(params, cytoplasm_scope="stained_cells"), cytoplasm=cyto, native=False)
    left, right = nuc[60, 50], nuc[60, 150]
    assert left > 0 and right > 0
    nuc_right = (nuc == right).sum()
    # everywhere: the unstained right cell cannot grow beyond its nucleus; scoped: it grows
    assert (everywhere == right).sum() <= nuc_right * 1.05
    assert (scoped == right).sum() > 1.5 * nuc_right
    # the stained left cell stops where its stain does, under both scopes
    for cells in (everywhere, scoped):
        assert not ((cells == left) & ~_disk(shape, 60, 50, 15)).any()  # 12 px stain + smoothing; free growth: 18 px


def _disks_image(r_px: int, n_side: int = 6, spacing: int = 40) -> np.ndarray:
    shape = (n_side * spacing, n_side * spacing)
    img = np.full(shape, 20.0, np.float32)
    for i in range(n_side):
        for j in range(n_side):
            img[_disk(shape, spacing // 2 + i * spacing, spacing // 2 + j * spacing, r_px)] = 1000.0
    return img + np.random.default_rng(1).normal(0, 3, shape).astype(np.float32)


def test_median_nucleus_diameter_is_measured_and_needs_enough_nuclei():
    from spatial_assets.segmentation.nuclei import median_nucleus_diameter_um

    lab = np.zeros((200, 200), np.int32)
    for k in range(25):
        lab[_disk(lab.shape, 20 + 40 * (k // 5), 20 + 40 * (k % 5), 10)] = k + 1
    d = median_nucleus_diameter_um(lab, P, 20)
    assert d == pytest.approx(2 * 10 * P, rel=0.05)
    assert median_nucleus_diameter_um(lab, P, 26) is None


def test_smoothing_follows_the_image_nucleus_size():
    from spatial_assets.segmentation.nuclei import median_nucleus_diameter_um, segment_nuclei

    params = replace(WatershedParams(), work_pixel_um=P)
    img = _disks_image(r_px=7)  # ~5.6 µm nuclei: smoothing 0.08 x d, below the fixed 0.64 µm
    _, nuc = segment_patch(img, P, params, native=False)
    first = segment_nuclei(img, P, params)
    d = median_nucleus_diameter_um(first, P, params.min_nuclei_for_scale)
    assert d is not None and params.smooth_fraction * d < params.smooth_um - 0.02  # the re-run is taken
    expected = segment_nuclei(img, P, replace(params, smooth_um=params.smooth_fraction * d))
    assert np.array_equal(nuc, expected)
    # with the fraction off, the fixed smoothing is used
    _, fixed = segment_patch(img, P, replace(params, smooth_fraction=None), native=False)
    assert np.array_equal(fixed, first)
    assert int(nuc.max()) == 36 and int(fixed.max()) == 36
