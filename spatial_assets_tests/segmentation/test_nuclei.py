"""Nucleus refinements of the watershed: re-split by the image's own nucleus size, convex merge, stain scope."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

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
