"""Seeded synthetic tissue with known domains, for tests and the scale benchmark.

Why this design: real domains are regions with a *mixture* of cell types, not a cell type of their own.
Each domain here is a set of Voronoi patches with its own cell-type composition (Dirichlet), cells get
counts from their type's profile (Poisson with log-normal library size), and each sample gets a mild
gene-wise batch effect. A single cell's expression therefore says its type, not its domain: only the
neighbourhood reveals the domain, which is what a domain method must exploit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from sklearn.neighbors import NearestNeighbors

TRUE_DOMAIN_OBS = "true_domain"
CELL_TYPE_OBS = "true_cell_type"


def make_synthetic_tissue(
    n_cells: int = 10_000,
    *,
    n_domains: int = 8,
    n_samples: int = 2,
    n_genes: int = 300,
    n_cell_types: int = 12,
    patches_per_domain: int = 3,
    composition_concentration: float = 1.0,
    batch_effect: float = 0.2,
    mean_library_size: float = 200.0,
    seed: int = 0,
) -> AnnData:
    """One AnnData, samples in ``obs['sample_id']``, truth in ``obs['true_domain']``, raw counts in X.

    Coordinates are in µm-like units with about 10 units between neighbouring cells, per sample
    a square; samples share the coordinate range on purpose (a graph must not join them).
    """
    if n_cells < n_samples * n_domains:
        raise ValueError(f"n_cells={n_cells} too small for {n_samples} samples × {n_domains} domains")
    rng = np.random.default_rng(seed)
    # cell-type profiles: a shared baseline plus type-specific markers
    base = rng.gamma(1.0, 1.0, n_genes)
    profiles = np.tile(base, (n_cell_types, 1))
    for t in range(n_cell_types):
        markers = rng.choice(n_genes, size=max(3, n_genes // 20), replace=False)
        profiles[t, markers] *= rng.uniform(3.0, 8.0, markers.size)
    profiles /= profiles.sum(1, keepdims=True)
    # domain compositions: a Dirichlet draw per domain, so domains overlap in cell types
    comps = rng.dirichlet(np.full(n_cell_types, composition_concentration), size=n_domains)

    per_sample = np.full(n_samples, n_cells // n_samples)
    per_sample[: n_cells % n_samples] += 1
    blocks, obs_parts, xy_parts = [], [], []
    for s, n in enumerate(per_sample):
        side = 10.0 * np.sqrt(n)
        xy = rng.uniform(0, side, size=(n, 2))
        n_seeds = n_domains * patches_per_domain
        seeds = rng.uniform(0, side, size=(n_seeds, 2))
        seed_domain = np.arange(n_seeds) % n_domains
        _, nearest = NearestNeighbors(n_neighbors=1).fit(seeds).kneighbors(xy)
        dom = seed_domain[nearest[:, 0]]
        # cell types from the domain's composition (inverse-CDF sampling, vectorised)
        cdf = np.cumsum(comps[dom], axis=1)
        ctype = (rng.random(n)[:, None] > cdf).sum(1).clip(max=n_cell_types - 1)
        batch = np.exp(rng.normal(0.0, batch_effect, n_genes))
        lib = rng.lognormal(np.log(mean_library_size), 0.4, n)
        rate = profiles[ctype] * batch[None, :]
        rate /= rate.sum(1, keepdims=True)
        counts = rng.poisson(rate * lib[:, None]).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
        sid = f"sample{s}"
        obs_parts.append(
            pd.DataFrame(
                {
                    "sample_id": sid,
                    TRUE_DOMAIN_OBS: [f"domain{d}" for d in dom],
                    CELL_TYPE_OBS: [f"type{t}" for t in ctype],
                },
                index=[f"{sid}_cell{i}" for i in range(n)],
            )
        )
        xy_parts.append(xy)
    obs = pd.concat(obs_parts)
    for col in obs.columns:
        obs[col] = obs[col].astype("category")
    out = AnnData(
        X=sp.vstack(blocks).tocsr(),
        obs=obs,
        var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]),
    )
    out.obsm["spatial"] = np.vstack(xy_parts)
    out.uns["synthetic"] = {
        "seed": seed,
        "n_domains": n_domains,
        "n_samples": n_samples,
        "n_cell_types": n_cell_types,
        "composition_concentration": composition_concentration,
        "batch_effect": batch_effect,
    }
    return out


def make_synthetic_spots(
    n_rows: int = 64,
    n_cols: int = 64,
    *,
    n_domains: int = 7,
    n_genes: int = 3_000,
    n_cell_types: int = 10,
    cells_per_spot: float = 8.0,
    marker_fraction: float = 0.03,
    mean_library_size: float = 2_500.0,
    dispersion: float = 0.2,
    normalized: bool = True,
    seed: int = 0,
    layout_seed: int | None = None,
) -> AnnData:
    """Spot-level whole-transcriptome tissue on a hexagonal lattice (Visium-like), layered domains.

    Why this design: spot data differs from single cells in every respect a domain method depends on —
    each spot already mixes several cells (so the spot itself is a small neighbourhood), spots sit on a
    regular lattice, thousands of genes are measured of which few carry structure, and public spot
    data usually ships library-size normalised without raw counts. Domains are layers (bands with wavy
    boundaries and unequal thickness, as cortical layers), each with its own cell-type composition;
    a spot's cells are drawn around its centre, so spots on a boundary mix two layers. Counts are
    negative binomial (``dispersion``) around the spot's mixture profile with a log-normal library.

    ``normalized=True`` (default): ``X`` = log1p(counts per 10,000), float32, and no raw counts anywhere
    (as spot data is usually shared); ``False``: raw counts in ``X``. Truth in ``obs['true_domain']``,
    lattice in ``obs['array_row'/'array_col']``, coordinates (100 units between spots) in ``obsm['spatial']``.
    ``seed`` draws the biology (profiles, layer compositions); ``layout_seed`` (default: ``seed``) the
    section (layer boundaries, cells, counts), so several sections of one tissue share ``seed``.
    """
    bio = np.random.default_rng(seed)
    rng = np.random.default_rng(seed if layout_seed is None else (seed, layout_seed))
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    spacing = 100.0
    xy = np.column_stack([(cols + 0.5 * (rows % 2)) * spacing, rows * spacing * np.sqrt(3) / 2])
    width, height = xy[:, 0].max(), xy[:, 1].max()
    # layer boundaries: unequal thickness, wavy
    thickness = rng.dirichlet(np.full(n_domains, 4.0)) * height
    base = np.cumsum(thickness)[:-1]
    amp = rng.uniform(0.02, 0.06, n_domains - 1) * height
    phase = rng.uniform(0, 2 * np.pi, n_domains - 1)
    period = rng.uniform(0.8, 1.6, n_domains - 1) * width

    def layer_of(p: np.ndarray) -> np.ndarray:
        bounds = base[None, :] + amp[None, :] * np.sin(2 * np.pi * p[:, :1] / period[None, :] + phase[None, :])
        return (p[:, 1:2] > bounds).sum(1)

    # expression: heavy-tailed baseline, a few markers per type, compositions per layer
    baseline = bio.lognormal(-1.0, 1.5, n_genes)
    profiles = np.tile(baseline, (n_cell_types, 1))
    n_markers = max(3, int(marker_fraction * n_genes))
    for t in range(n_cell_types):
        markers = bio.choice(n_genes, size=n_markers, replace=False)
        profiles[t, markers] *= bio.uniform(3.0, 10.0, n_markers)
    profiles /= profiles.sum(1, keepdims=True)
    comps = bio.dirichlet(np.full(n_cell_types, 0.5), size=n_domains)
    n_spots = xy.shape[0]
    n_cells = np.maximum(1, rng.poisson(cells_per_spot, n_spots))
    owner = np.repeat(np.arange(n_spots), n_cells)
    # each cell within one spot radius (0.55 spacing) of its spot centre
    r = 0.55 * spacing * np.sqrt(rng.random(owner.size))
    ang = rng.uniform(0, 2 * np.pi, owner.size)
    cell_xy = xy[owner] + np.column_stack([r * np.cos(ang), r * np.sin(ang)])
    cell_dom = layer_of(cell_xy)
    cdf = np.cumsum(comps[cell_dom], axis=1)
    cell_type = (rng.random(owner.size)[:, None] > cdf).sum(1).clip(max=n_cell_types - 1)
    mix = np.zeros((n_spots, n_cell_types))
    np.add.at(mix, (owner, cell_type), 1.0)
    mix /= mix.sum(1, keepdims=True)
    lib = rng.lognormal(np.log(mean_library_size), 0.5, n_spots)
    mu = (mix @ profiles) * lib[:, None]
    shape = 1.0 / dispersion
    counts = rng.poisson(rng.gamma(shape, mu / shape)).astype(np.float32)
    dom = layer_of(xy)
    obs = pd.DataFrame(
        {
            TRUE_DOMAIN_OBS: pd.Categorical([f"layer{d}" for d in dom]),
            "array_row": rows,
            "array_col": cols,
            "n_cells": n_cells,
        },
        index=[f"spot{i}" for i in range(n_spots)],
    )
    x = sp.csr_matrix(counts)
    if normalized:
        sums = np.asarray(x.sum(1)).ravel()
        x = sp.csr_matrix(sp.diags(np.divide(1e4, sums, out=np.zeros_like(sums), where=sums > 0)) @ x, dtype=np.float32)
        x.data = np.log1p(x.data)
    out = AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]))
    out.obsm["spatial"] = xy
    out.uns["synthetic"] = {"seed": seed, "n_domains": n_domains, "kind": "spots", "normalized": bool(normalized)}
    return out


def split_samples(adata: AnnData, sample_key: str = "sample_id") -> list[AnnData]:
    """One AnnData per sample (copies), in category order."""
    keys = adata.obs[sample_key].astype("category").cat.categories
    return [adata[(adata.obs[sample_key] == k).to_numpy()].copy() for k in keys]


__all__ = ["CELL_TYPE_OBS", "TRUE_DOMAIN_OBS", "make_synthetic_spots", "make_synthetic_tissue", "split_samples"]
