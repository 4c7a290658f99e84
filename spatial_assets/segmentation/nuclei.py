"""Weight-free nucleus segmentation and cell expansion on one image patch (scikit-image).

Every length is in µm and converted with the patch's pixel size, so one parameter set transfers
between instruments (0.108 µm MERSCOPE mosaics, 0.18 µm CosMx, 0.2125 µm Xenium). The work is done
at a working resolution of about ``work_pixel_um`` (nuclei are tens of pixels wide at the native
resolution; averaging blocks of pixels first is faster and less noisy) and the labels are brought
back to the native grid at the end.

Steps, and why each is there (measured in ``docs/segmentation.md``):

1. Gaussian smoothing against shot noise and chromatin texture, at a scale taken from the image:
   ``smooth_fraction`` × the median equivalent diameter of a first pass's nuclei in the patch
   (0.08 × 8 µm = 0.64 µm; the fixed ``smooth_um`` when the patch has too few nuclei to measure).
   Smaller nuclei keep their necks and outlines under less blur.
2. Foreground = above a *local* threshold (Gaussian-weighted mean over ``local_block_um``) and above
   half the global Otsu level: a local threshold follows uneven background and keeps dim nuclei
   that a global threshold loses; the global floor stops it from segmenting empty background.
3. Seeds = h-maxima (``h_um``, in µm of depth) of the *smoothed* distance transform: one seed per
   convex body, so touching nuclei separate along their neck but a nucleus is not shattered by its
   texture.
4. Seeded watershed on the smoothed distance, within the foreground; then every object larger
   than ``split_area_ratio`` × this image's own median object area is re-seeded alone with
   seeds ``split_h_fraction`` as deep (:func:`split_large`): the deep seeds keep single
   (elongated, textured) nuclei whole, the shallow re-seeding separates touching nuclei, and which
   objects get it is decided by the image's own nucleus size, not by a constant in µm².
5. Per-nucleus half-maximum boundary: each nucleus keeps the pixels above
   ``background + half_max · (peak − background)`` with its *own* peak and its surrounding
   background, so a blurred image does not inflate bright nuclei and dim nuclei keep their size.
6. Expansion to cells: ``skimage.segmentation.expand_labels`` stops each cell at its neighbours;
   ``expansion='adaptive'`` gives every cell its own distance (between ``min_expand_um`` and
   ``expand_um``) where its transcript density drops to the patch's background level (a two-level
   Poisson change point over 0.5 µm rings), and where the image has a cytoplasm stain (MERSCOPE
   PolyT) the cell also stops where that stain does. ``expansion='fixed'`` expands by ``expand_um``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class WatershedParams:
    nucleus_diameter_um: float = 8.0
    work_pixel_um: float = 0.4
    smooth_um: float = 0.64
    #: smoothing from the image's own nuclei: sigma = this × the median equivalent diameter of a
    #: first pass's nuclei in the patch (at least ``min_nuclei_for_scale`` of them; else ``smooth_um``).
    #: 0.08 × 8 µm = the fixed 0.64 µm. None = fixed ``smooth_um``
    smooth_fraction: float | None = 0.08
    min_nuclei_for_scale: int = 20
    threshold: Literal["local", "otsu", "background"] = "local"
    #: 'background': foreground = above this fraction of Otsu on the background-subtracted image
    background_fraction: float = 0.5
    local_block_um: float = 16.0
    h_um: float = 0.6
    min_nucleus_area_um2: float = 7.5
    #: seeds and watershed on distance x (intensity / local peak) ** weight (0 = distance only)
    seed_intensity_weight: float = 0.0
    #: where seeds come from: 'distance' (h-maxima of the smoothed distance transform) or
    #: 'intensity' (h-maxima of the stain smoothed at a quarter of a nucleus, depth a fraction of
    #: the image's foreground contrast: splits touching nuclei along their darker neck)
    seed_source: Literal["distance", "intensity", "both"] = "distance"
    seed_intensity_h: float = 0.1
    #: over-split then merge: neighbouring watershed pieces are merged while their union is convex
    #: (solidity >= this; None = off) — a nucleus is convex, two touching nuclei are not
    merge_solidity: float | None = None
    #: objects larger than this multiple of the image's own median nucleus area are re-split
    #: (None = off) with seeds ``split_h_fraction`` as deep, from ``split_source``
    split_area_ratio: float | None = 1.5
    split_h_fraction: float = 0.5
    split_source: Literal["distance", "intensity"] = "distance"
    seed_intensity_sigma: float = 0.25
    half_max: float | None = 0.5
    #: the nucleus's plateau level for the half-maximum boundary: this percentile of its intensity
    plateau_percentile: float = 95.0
    expansion: Literal["adaptive", "fixed"] = "adaptive"
    expand_um: float = 6.0
    min_expand_um: float = 2.0
    ring_um: float = 0.5
    #: density a cell's edge is detected against: 'global' = the patch's background (empty space);
    #: 'local' = each cell's own density beyond its edge (fitted, at least the patch's background)
    expansion_background: Literal["global", "local"] = "global"
    edge_bic: float = 2.0
    min_cell_transcripts: int = 8
    use_cytoplasm_stain: bool = True
    #: block of the cytoplasm stain's local threshold (None: ``local_block_um``)
    #: wider than the nuclear block: the stain is compared with the background around a cell and its
    #: neighbours, not with the neighbours (16 µm: MERSCOPE F1 0.613 / 67.6 %; 32 µm: 0.607 / 71.6 %,
    #: bench_segmentation_alternatives.py)
    cytoplasm_block_um: float | None = 32.0
    #: 'everywhere': every cell stops where the cytoplasm stain does (a stain all cells take, PolyT);
    #: 'stained_cells': only cells whose perinuclear ring is mostly above the stain's Otsu level (a marker
    #: some cells take, e.g. a CosMx composite's PanCK channel); the others expand as without it
    cytoplasm_scope: Literal["everywhere", "stained_cells"] = "everywhere"

    def as_dict(self) -> dict:
        return asdict(self)


#: the naive reference of the issue: global Otsu + distance watershed + 2 µm fixed expansion
NAIVE_OTSU = WatershedParams(threshold="otsu", half_max=None, expansion="fixed", expand_um=2.0, h_um=0.45,
                             split_area_ratio=None, smooth_fraction=None)


def _downsample(img: np.ndarray, f: int) -> np.ndarray:
    """Block mean by ``f`` (the last partial blocks padded with edge values)."""
    if f == 1:
        return img.astype(np.float32)
    H, W = -(-img.shape[0] // f) * f, -(-img.shape[1] // f) * f
    padded = np.pad(img.astype(np.float32), ((0, H - img.shape[0]), (0, W - img.shape[1])), mode="edge")
    return padded.reshape(H // f, f, W // f, f).mean((1, 3))


def _upsample(lab: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    if f == 1:
        return lab[: shape[0], : shape[1]]
    return np.repeat(np.repeat(lab, f, 0), f, 1)[: shape[0], : shape[1]]


def working_factor(pixel_um: float, params: WatershedParams) -> int:
    return max(1, int(round(params.work_pixel_um / pixel_um)))


def h_maxima(f: np.ndarray, h: float, *, max_iter: int = 500) -> np.ndarray:
    """Boolean h-maxima (peaks whose dynamic is at least ``h``), as ``skimage.morphology.h_maxima``.

    Reconstruction by dilation of ``f - h`` under ``f`` with repeated 3x3 grey dilations, which
    converges in a few tens of steps on a smoothed distance map; ``skimage``'s reconstruction sorts
    every pixel and took a quarter of the run time (docs/segmentation.md).
    """
    f = f.astype(np.float32)
    rec = f - np.float32(h)
    for _ in range(max_iter):
        nxt = np.minimum(ndi.grey_dilation(rec, size=(3, 3)), f)
        if np.array_equal(nxt, rec):
            break
        rec = nxt
    return (f - rec) >= np.float32(h) * (1 - 1e-4)


def _label_percentile(values: np.ndarray, labels: np.ndarray, n: int, q: float, default: float) -> np.ndarray:
    """q-th percentile (nearest rank) of ``values`` per label 1..n, in one sort."""
    m = labels > 0
    lab, val = labels[m].astype(np.int64), values[m]
    out = np.full(n, default, dtype=np.float64)
    if lab.size == 0:
        return out
    order = np.lexsort((val, lab))
    lab, val = lab[order], val[order]
    counts = np.bincount(lab, minlength=n + 1)[1:]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    has = counts > 0
    idx = starts[has] + np.floor(q / 100.0 * (counts[has] - 1)).astype(np.int64)
    out[has] = val[idx]
    return out


def segment_nuclei(img: np.ndarray, p: float, params: WatershedParams) -> np.ndarray:
    """Nucleus labels (int32) of a 2D image at pixel size ``p`` µm (already at working resolution)."""
    from skimage import filters, measure, morphology, segmentation

    if img.size == 0 or not np.isfinite(img).all() or float(img.max()) <= float(img.min()):
        return np.zeros(img.shape, np.int32)
    sm = filters.gaussian(img, sigma=max(params.smooth_um / p, 0.5), preserve_range=True)
    otsu = filters.threshold_otsu(sm)
    if params.threshold == "otsu":
        fg = sm > otsu
    elif params.threshold == "background":
        # rolling-ball-like background: grey opening wider than a nucleus, then smoothed
        rad = max(int(round(params.nucleus_diameter_um / p)), 2)
        small = sm[::2, ::2] if rad > 8 else sm
        bg = ndi.grey_opening(small, footprint=morphology.disk(max(rad // (2 if rad > 8 else 1), 1)))
        if small is not sm:
            bg = np.repeat(np.repeat(bg, 2, 0), 2, 1)[: sm.shape[0], : sm.shape[1]]
        bg = filters.gaussian(bg, sigma=rad / 2, preserve_range=True)
        res = sm - bg
        fg = res > params.background_fraction * filters.threshold_otsu(res)
    else:
        block = int(2 * round(params.local_block_um / p / 2) + 1)
        fg = (sm > filters.threshold_local(sm, block_size=max(block, 3), method="gaussian")) & (sm > 0.5 * otsu)
    fg = ndi.binary_fill_holes(fg)
    min_px = max(1, int(params.min_nucleus_area_um2 / (p * p)))
    fg = morphology.remove_small_objects(fg, max_size=min_px)
    if not fg.any():
        return np.zeros(img.shape, np.int32)
    r = params.nucleus_diameter_um / 2 / p
    dist = filters.gaussian(ndi.distance_transform_edt(fg), sigma=max(r / 4, 0.5), preserve_range=True)
    if params.seed_intensity_weight > 0:
        # an intensity dip between touching nuclei lowers the score along their neck
        peak = ndi.maximum_filter(sm, size=max(int(2 * r), 3))
        rel = np.clip(sm / np.maximum(peak, 1e-9), 0, 1)
        dist = dist * rel ** params.seed_intensity_weight
    if params.seed_source == "distance":
        markers = measure.label(h_maxima(dist, params.h_um / p) & fg)
        lab = segmentation.watershed(-dist, markers, mask=fg).astype(np.int32)
    else:
        smi = filters.gaussian(img, sigma=max(params.seed_intensity_sigma * 2 * r, 0.5), preserve_range=True)
        lo, hi = np.percentile(smi[fg], [5, 95])
        pk = h_maxima(smi, params.seed_intensity_h * max(hi - lo, 1e-9)) & fg
        if params.seed_source == "both":
            # an intensity peak splits a distance body only when both say there are several
            land = dist / max(r, 1e-9) + (smi - lo) / max(hi - lo, 1e-9)
            pk = h_maxima(land, params.seed_intensity_h + params.h_um / p / max(r, 1e-9)) & fg
            markers = measure.label(pk)
            lab = segmentation.watershed(-land, markers, mask=fg).astype(np.int32)
        else:
            markers = measure.label(pk)
            lab = segmentation.watershed(-smi, markers, mask=fg).astype(np.int32)
    if params.split_area_ratio is not None and lab.max() > 1:
        lab = split_large(lab, sm, p, params)
    if params.merge_solidity is not None and lab.max() > 1:
        lab = merge_convex_pieces(lab, params.merge_solidity)
    if params.half_max is not None and lab.max() > 0:
        lab = _half_max(lab, sm, p, params)
    # drop fragments left below the minimum size, renumber 1..n
    sizes = np.bincount(lab.ravel())
    small = sizes < min_px
    small[0] = False
    lab[small[lab]] = 0
    lab, _, _ = segmentation.relabel_sequential(lab)
    return lab.astype(np.int32)


def split_large(lab: np.ndarray, sm: np.ndarray, p: float, params: WatershedParams) -> np.ndarray:
    """Re-split objects far larger than this image's typical nucleus (its median object area).

    The seed depth ``h_um`` is one value for the whole image; an object several times the median
    nucleus area of the same image is most often touching nuclei whose neck was too shallow for it.
    Such an object alone is re-seeded with shallower seeds (its own distance transform, or its
    smoothed stain: a dimmer neck) and split when that gives several pieces.
    """
    from skimage import filters, measure, segmentation

    sizes = np.bincount(lab.ravel())[1:]
    sizes_pos = sizes[sizes > 0]
    if sizes_pos.size < 5:
        return lab
    med = float(np.median(sizes_pos))
    big = np.nonzero(sizes > params.split_area_ratio * med)[0] + 1
    if big.size == 0:
        return lab
    out = lab.copy()
    nxt = int(lab.max()) + 1
    r = params.nucleus_diameter_um / 2 / p
    objs = ndi.find_objects(lab)
    for i in big:
        slc = objs[i - 1]
        if slc is None:
            continue
        slc = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in slc)
        m = lab[slc] == i
        if params.split_source == "intensity":
            land = filters.gaussian(sm[slc], sigma=max(r / 4, 0.5), preserve_range=True)
            lo, hi = np.percentile(land[m], [5, 95])
            h = params.split_h_fraction * max(hi - lo, 1e-9)
        else:
            land = filters.gaussian(ndi.distance_transform_edt(m), sigma=max(r / 4, 0.5), preserve_range=True)
            h = params.split_h_fraction * params.h_um / p
        mk = measure.label(h_maxima(land, h) & m)
        if mk.max() < 2:
            continue
        sub = segmentation.watershed(-land, mk, mask=m)
        region = out[slc]
        for k in range(2, int(sub.max()) + 1):
            region[sub == k] = nxt
            nxt += 1
    return out


def _hull_area(rows: np.ndarray, cols: np.ndarray) -> float:
    """Pixels inside the convex hull of a set of pixels (``skimage``'s discretisation: 1 for a disk)."""
    from skimage.morphology import convex_hull_image

    r0, c0 = rows.min(), cols.min()
    img = np.zeros((rows.max() - r0 + 1, cols.max() - c0 + 1), bool)
    img[rows - r0, cols - c0] = True
    try:
        return float(convex_hull_image(img).sum())
    except Exception:  # degenerate (a line of pixels)
        return float(rows.size)


def merge_convex_pieces(lab: np.ndarray, min_solidity: float) -> np.ndarray:
    """Merge touching labels while the union of a pair is convex (solidity >= ``min_solidity``).

    The watershed is run with shallow seeds, which splits touching nuclei at their neck but also
    cuts some single nuclei (elongated or textured) in two. A single nucleus is close to convex and
    two touching ones are not, so pieces are merged back, best union first, while the union's area
    over its convex hull's area stays at least ``min_solidity``.
    """
    lab = lab.copy()
    n = int(lab.max())
    # touching pairs (4-connectivity) and the pixels of each label
    a = np.concatenate([lab[:, :-1].ravel(), lab[:-1, :].ravel()])
    b = np.concatenate([lab[:, 1:].ravel(), lab[1:, :].ravel()])
    m = (a > 0) & (b > 0) & (a != b)
    if not m.any():
        return lab
    pairs = {(int(min(x, y)), int(max(x, y))) for x, y in zip(a[m], b[m])}
    objs = ndi.find_objects(lab)
    pix: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, slc in enumerate(objs, start=1):
        if slc is None:
            continue
        rr, cc = np.nonzero(lab[slc] == i)
        pix[i] = (rr + slc[0].start, cc + slc[1].start)
    nbrs: dict[int, set[int]] = {i: set() for i in pix}
    for x, y in pairs:
        nbrs[x].add(y)
        nbrs[y].add(x)

    def solidity(x: int, y: int) -> float:
        r = np.concatenate([pix[x][0], pix[y][0]])
        c = np.concatenate([pix[x][1], pix[y][1]])
        return r.size / _hull_area(r, c)

    score = {pq: solidity(*pq) for pq in pairs}
    parent = np.arange(n + 1)
    while score:
        (x, y), best = max(score.items(), key=lambda kv: kv[1])
        if best < min_solidity:
            break
        # merge y into x
        parent[y] = x
        pix[x] = (np.concatenate([pix[x][0], pix[y][0]]), np.concatenate([pix[x][1], pix[y][1]]))
        del pix[y]
        for z in nbrs.pop(y):
            nbrs[z].discard(y)
            if z != x:
                nbrs[z].add(x)
                nbrs[x].add(z)
        nbrs[x].discard(y)
        nbrs[x].discard(x)
        score = {pq: v for pq, v in score.items() if x not in pq and y not in pq}
        for z in nbrs[x]:
            score[(min(x, z), max(x, z))] = solidity(x, z)
    # resolve chains of merges
    for i in range(1, n + 1):
        r = i
        while parent[r] != r:
            r = parent[r]
        parent[i] = r
    return parent[lab].astype(np.int32)


def _half_max(lab: np.ndarray, sm: np.ndarray, p: float, params: WatershedParams) -> np.ndarray:
    """Per-object half-maximum boundary, one piece (the largest) per object."""
    from skimage import measure, segmentation

    n = int(lab.max())
    peak = _label_percentile(sm, lab, n, params.plateau_percentile, 0.0)
    ring = segmentation.expand_labels(lab, distance=params.nucleus_diameter_um / 2 / p)
    ring[lab > 0] = 0
    bg = _label_percentile(sm, ring, n, 10, float(np.percentile(sm, 5)))
    thr = np.concatenate([[np.inf], bg + params.half_max * (peak - bg)])
    out = np.where(sm >= thr[lab], lab, 0)
    # keep one piece per nucleus (the largest)
    pieces = measure.label(out > 0, connectivity=1)
    if pieces.max() > out.max():
        sizes = np.bincount(pieces.ravel())
        owner = np.zeros(pieces.max() + 1, np.int64)
        owner[pieces[out > 0]] = out[out > 0]
        best = np.zeros(n + 1, np.int64)
        order = np.argsort(sizes[1:])  # ascending: the largest piece of each nucleus is written last
        for piece in order + 1:
            best[owner[piece]] = piece
        keep = np.zeros(pieces.max() + 1, bool)
        keep[best[best > 0]] = True
        out[~keep[pieces]] = 0
    return out


def _adaptive_expand(nuc: np.ndarray, p: float, params: WatershedParams, tx_rc, allowed: np.ndarray | None) -> np.ndarray:
    """Per-cell expansion: two-level Poisson change point on ring transcript densities."""
    n = int(nuc.max())
    max_px = params.expand_um / p
    # one Euclidean transform gives both the distance and the nearest nucleus (= expand_labels)
    dist_px, (ir, ic) = ndi.distance_transform_edt(nuc == 0, return_indices=True)
    terr = np.where(dist_px <= max_px, nuc[ir, ic], 0)
    del ir, ic
    dist = dist_px * p
    if allowed is not None:
        terr = np.where(allowed | (nuc > 0), terr, 0)
    if tx_rc is None or n == 0:
        R = np.full(n, params.expand_um)
    else:
        step = params.ring_um
        K = int(np.ceil(params.expand_um / step)) + 1
        ring = np.minimum((dist / step).astype(np.int64), K - 1)
        m = terr > 0
        area = np.bincount(terr[m].astype(np.int64) * K + ring[m], minlength=(n + 1) * K).reshape(n + 1, K) * p * p
        r, c = tx_rc
        ok = (r >= 0) & (r < nuc.shape[0]) & (c >= 0) & (c < nuc.shape[1])
        r, c = r[ok], c[ok]
        t = terr[r, c]
        mm = t > 0
        cnt = np.bincount(t[mm].astype(np.int64) * K + ring[r[mm], c[mm]], minlength=(n + 1) * K).reshape(n + 1, K)
        free = terr == 0
        free_area = free.sum() * p * p
        if free_area > 400.0:  # enough empty space to measure the background density
            bg = float((~mm).sum()) / free_area
        else:
            outer = cnt[1:, -1] / np.maximum(area[1:, -1], 1e-9)
            bg = float(np.percentile(outer[area[1:, -1] > 0], 10)) if (area[1:, -1] > 0).any() else 0.0
        bg = max(bg, 1e-4)
        cn, ca = np.cumsum(cnt[1:], 1), np.cumsum(area[1:], 1)
        totn, tota = cn[:, -1:], ca[:, -1:]
        lam = np.maximum(cn / np.maximum(ca, 1e-9), bg)
        if params.expansion_background == "local":
            # each cell's own outer level (the density beyond its edge), at least the slide's background
            on, oa = totn - cn, tota - ca
            lam_out = np.clip(on / np.maximum(oa, 1e-9), bg, lam)
            with np.errstate(divide="ignore", invalid="ignore"):
                ll = cn * np.log(lam) - lam * ca + np.where(on > 0, on * np.log(lam_out), 0.0) - lam_out * oa
        else:
            ll = cn * np.log(lam) - lam * ca + (totn - cn) * np.log(bg) - bg * (tota - ca)
        R = (ll.argmax(1) + 1) * step
        if params.expansion_background == "local":
            # an edge only where two levels explain the rings better than one (BIC: two extra
            # parameters, the outer level and the change point); otherwise the cell fills its range
            lam1 = np.maximum(totn / np.maximum(tota, 1e-9), 1e-9)
            ll1 = (totn * np.log(lam1) - lam1 * tota)[:, 0]
            weak = 2 * (ll.max(1) - ll1) < params.edge_bic * np.log(np.maximum(totn[:, 0], 2))
            R[weak] = K * step
        few = totn[:, 0] < params.min_cell_transcripts
        if (~few).any():
            R[few] = np.median(R[~few])
        R = np.clip(R, params.min_expand_um, params.expand_um)
    lut = np.concatenate([[0.0], R])
    cells = np.where(dist <= lut[terr], terr, 0)
    cells[nuc > 0] = nuc[nuc > 0]
    return cells.astype(np.int32)


def median_nucleus_diameter_um(nuc: np.ndarray, p: float, min_count: int) -> float | None:
    """Median equivalent diameter (µm) of the labels of ``nuc``; None with fewer than ``min_count``."""
    sizes = np.bincount(nuc.ravel())[1:]
    sizes = sizes[sizes > 0]
    if sizes.size < min_count:
        return None
    return float(2.0 * np.sqrt(np.median(sizes) * p * p / np.pi))


def _stained_cells_only(allowed: np.ndarray, cyto: np.ndarray, nuc: np.ndarray, p: float, params: WatershedParams) -> np.ndarray:
    """Limit only the cells that take the stain: around the others every pixel stays allowed.

    A cell takes the stain when most of the ring just outside its nucleus (``min_expand_um`` wide,
    where every cell has cytoplasm) is above the stain's Otsu level.
    """
    from skimage import filters, segmentation

    if float(cyto.max()) <= float(cyto.min()):
        return np.ones_like(allowed)
    ring = segmentation.expand_labels(nuc, distance=max(params.min_expand_um, params.ring_um) / p)
    ring[nuc > 0] = 0
    pos = cyto > filters.threshold_otsu(cyto)
    n = int(nuc.max())
    frac = np.bincount(ring.ravel(), weights=pos.ravel(), minlength=n + 1) / np.maximum(np.bincount(ring.ravel(), minlength=n + 1), 1)
    stained = frac >= 0.5
    stained[0] = False
    terr = segmentation.expand_labels(nuc, distance=params.expand_um / p)
    return allowed | ~stained[terr]


def cytoplasm_mask(img: np.ndarray, p: float, params: WatershedParams) -> np.ndarray:
    """Where a cytoplasm stain is above its local level (the cells' extent on that stain)."""
    from skimage import filters

    sm = filters.gaussian(img, sigma=max(params.smooth_um / p, 0.5), preserve_range=True)
    block_um = params.cytoplasm_block_um or params.local_block_um
    block = int(2 * round(block_um / p / 2) + 1)
    return sm > filters.threshold_local(sm, block_size=max(block, 3), method="gaussian")


def segment_patch(
    nuclear: np.ndarray,
    pixel_um: float,
    params: WatershedParams,
    *,
    cytoplasm: np.ndarray | None = None,
    transcripts_rc: tuple[np.ndarray, np.ndarray] | None = None,
    native: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(cells, nuclei) labels; cell ``i`` grows from nucleus ``i``.

    ``transcripts_rc``: (row, col) native pixel positions of the patch's transcripts (adaptive
    expansion). ``native=False`` returns the labels at the working resolution (block
    ``working_factor`` of native pixels per label pixel), which is what the vectoriser needs.
    """
    from skimage import segmentation

    f = working_factor(pixel_um, params)
    p = pixel_um * f
    small = _downsample(nuclear, f)
    nuc = segment_nuclei(small, p, params)
    if params.smooth_fraction is not None:
        d = median_nucleus_diameter_um(nuc, p, params.min_nuclei_for_scale)
        if d is not None:
            # bounded: a patch of debris must not make the smoothing absurd
            smooth = float(np.clip(params.smooth_fraction * d, 0.5 * params.smooth_um, 2.0 * params.smooth_um))
            if abs(smooth - params.smooth_um) > 0.02:
                nuc = segment_nuclei(small, p, replace(params, smooth_um=smooth))
    allowed = None
    if cytoplasm is not None and params.use_cytoplasm_stain:
        cyto_small = _downsample(cytoplasm, f)
        allowed = cytoplasm_mask(cyto_small, p, params)
        if params.cytoplasm_scope == "stained_cells" and nuc.max() > 0:
            allowed = _stained_cells_only(allowed, cyto_small, nuc, p, params)
    if params.expansion == "fixed" or transcripts_rc is None:
        cells = segmentation.expand_labels(nuc, distance=params.expand_um / p)
        if allowed is not None:
            cells = np.where(allowed | (nuc > 0), cells, 0)
    else:
        rc = (np.floor(transcripts_rc[0] / f).astype(np.int64), np.floor(transcripts_rc[1] / f).astype(np.int64))
        cells = _adaptive_expand(nuc, p, params, rc, allowed)
    if not native:
        return cells.astype(np.int32), nuc.astype(np.int32)
    return _upsample(cells, f, nuclear.shape).astype(np.int32), _upsample(nuc, f, nuclear.shape).astype(np.int32)


def he_to_nuclear(rgb: np.ndarray) -> np.ndarray:
    """H&E RGB (y, x, 3) → haematoxylin channel as uint16 (nuclei bright), via ``skimage.color.rgb2hed``."""
    from skimage.color import rgb2hed

    h = rgb2hed(rgb)[..., 0]
    lo, hi = np.percentile(h, [0.5, 99.5])
    return (np.clip((h - lo) / max(hi - lo, 1e-9), 0, 1) * 65535).astype(np.uint16)


__all__ = ["NAIVE_OTSU", "WatershedParams", "cytoplasm_mask", "he_to_nuclear", "segment_nuclei", "segment_patch", "working_factor"]
