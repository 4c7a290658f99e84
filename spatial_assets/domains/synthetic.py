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


def split_samples(adata: AnnData, sample_key: str = "sample_id") -> list[AnnData]:
    """One AnnData per sample (copies), in category order."""
    keys = adata.obs[sample_key].astype("category").cat.categories
    return [adata[(adata.obs[sample_key] == k).to_numpy()].copy() for k in keys]


__all__ = ["CELL_TYPE_OBS", "TRUE_DOMAIN_OBS", "make_synthetic_tissue", "split_samples"]
