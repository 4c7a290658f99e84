"""Spot-level samples as the platform runs them (no Dagster): landing, deconvolution, domains.

A spot-level sample (Visium spots, Visium HD bins of one size) is its own kind of sample: each row
is a spot / bin that mixes several cells, so it is *deconvolved* with the registered references
instead of being annotated cell by cell. It lands under its own prefix, ``landing/spots/``:

* ``<id>.h5ad`` — a spot table marked as one (``uns['spot']``, written by
  :func:`spatial_assets.deconvolution.as_spot_sample` or ``spatial-assets deconvolve --kind``):
  raw counts, ``obs['array_row'/'array_col']``, the spot diameter or bin size;
* ``<id>/...`` — a SpaceRanger Visium HD output folder (``binned_outputs/square_NNNum/``), read by
  the segmentation issue's :func:`~spatial_assets.segmentation.visium_hd.read_visium_hd_bins` at the
  deployment's bin size; only in-tissue bins are kept.

The reference is the same as cell typing's: every registered ``reference_atlas`` combined on the
sample's panel (:func:`~spatial_assets.platform.panels.sample_panel`, the same rule) with the training
set's ontology mapping and Cap & Fill balancing (:func:`~spatial_assets.platform.workflow.build_training_set`).

Domains of a spot sample are clusters of the proportions averaged over the spot lattice
(:func:`~spatial_assets.deconvolution.spots.grid_graph`, the grid, not a k-NN of coordinates): the
cell-level domain engines embed each cell's expression and its neighbours', which for a spot is
already a mixture; the proportions are what a spot's neighbourhood is made of.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from spatial_assets.core import schema
from spatial_assets.core.ids import validate_id
from spatial_assets.core.lineage import content_hash
from spatial_assets.deconvolution import (
    DOMINANT,
    PROPORTIONS_KEY,
    UNS_KEY,
    SpotSampleError,
    as_spot_sample,
    deconvolve,
    grid_graph,
    is_spot_sample,
)
from spatial_assets.deconvolution.counts import spot_counts
from spatial_assets.deconvolution.spots import SPOT_UNS, VISIUM, VISIUM_HD_BIN
from spatial_assets.platform.panels import Panel
from spatial_assets.platform.registry import H5AD, LandedSample, prefix_uri

#: where spot-level samples land (a sibling of the cell samples' ``landing/samples/``)
SPOT_LANDING_PREFIX = "landing/spots/"
#: obs column of the spot domains, and of the top cell type of each spot's domain
SPOT_DOMAIN = "domain"
SPOT_DOMAIN_TOP_TYPE = "domain_top_cell_type"


def _size_args(record: dict[str, Any]) -> dict[str, Any]:
    kind = str(record.get("kind", ""))
    if kind == VISIUM:
        return {"kind": VISIUM, "spot_diameter_um": float(record["spot_diameter_um"]) if "spot_diameter_um" in record else None}
    if kind == VISIUM_HD_BIN:
        if "bin_size_um" not in record:
            raise SpotSampleError("uns['spot'] of a visium_hd_bin sample needs bin_size_um")
        return {"kind": VISIUM_HD_BIN, "bin_size_um": float(record["bin_size_um"])}
    raise SpotSampleError(f"uns['spot']['kind'] is {kind!r}; expected {VISIUM!r} or {VISIUM_HD_BIN!r}")


def read_landed_spots(store: Any, landed: LandedSample, *, bin_size_um: int = 8) -> tuple[ad.AnnData, str]:
    """The landed spot sample (not yet validated) and the URI it was read from.

    An ``.h5ad`` must carry the ``uns['spot']`` marker (a cell table landed here by mistake would
    otherwise be deconvolved); a folder is read as SpaceRanger Visium HD output at ``bin_size_um``.
    """
    h5ads = [k for k in landed.keys if k.endswith(H5AD)]
    if len(landed.keys) == 1 and h5ads:
        key = h5ads[0]
        uri = store.uri(key)
        adata = ad.read_h5ad(store.get_file(key))
        if not is_spot_sample(adata):
            raise SpotSampleError(
                f"{uri}: not marked as a spot-level sample (no uns['spot'] with kind visium / visium_hd_bin); "
                "mark it with spatial_assets.deconvolution.as_spot_sample or land cell tables under landing/samples/"
            )
        return as_spot_sample(adata, **_size_args(dict(adata.uns[SPOT_UNS])), source=uri), uri
    from spatial_assets.segmentation.visium_hd import read_visium_hd_bins

    root = _common_root(landed)
    uri = prefix_uri(store, root)
    wanted = f"binned_outputs/square_{int(bin_size_um):03d}um/"
    with tempfile.TemporaryDirectory(prefix="spots_") as tmp:
        for key in landed.keys:
            rel = key[len(root) :].lstrip("/")
            local = Path(tmp) / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            if rel.startswith(wanted):  # only the chosen bin size (the 2 µm matrix alone can be GBs)
                local.write_bytes(Path(store.get_file(key)).read_bytes())
        try:
            bins = read_visium_hd_bins(tmp, bin_size_um=int(bin_size_um))
        except Exception as exc:
            raise SpotSampleError(f"{uri}: not a readable Visium HD output at {bin_size_um} µm: {exc}") from exc
    if "in_tissue" in bins.obs:
        bins = bins[bins.obs["in_tissue"].to_numpy() == 1].copy()
    return as_spot_sample(bins, kind=VISIUM_HD_BIN, bin_size_um=float(bin_size_um), source=uri), uri


def _common_root(landed: LandedSample) -> str:
    first = landed.keys[0]
    marker = f"/{landed.sample_id}/"
    return first[: first.index(marker) + len(marker)]


def prepare_spot_sample(spots: ad.AnnData, *, sample_id: str, source: str) -> ad.AnnData:
    """Validated spot sample: raw integer counts (checked exactly), unique gene names, ``obs['sample_id']``,
    a content hash. Bad counts raise here, before anything is stored."""
    validate_id(sample_id, "spot sample id")
    if not is_spot_sample(spots):
        raise SpotSampleError(f"{source}: not a spot-level sample (no uns['spot'])")
    if not spots.var_names.is_unique:
        dup = spots.var_names[spots.var_names.duplicated()][:5].tolist()
        raise SpotSampleError(f"{source}: duplicate gene names, e.g. {dup}")
    spot_counts(spots, name=source)  # negative / non-integer values: an error naming the spot and gene
    out = spots.copy()
    out.obs[schema.SAMPLE_KEY] = pd.Categorical([sample_id] * out.n_obs)
    out.uns["content_sha256"] = content_hash(out)
    out.uns["source_uri"] = source
    return out


def spot_size(spots: ad.AnnData) -> dict[str, Any]:
    """``kind`` and the spot diameter or bin size recorded in ``uns['spot']``."""
    record = dict(spots.uns[SPOT_UNS])
    out: dict[str, Any] = {"kind": str(record["kind"])}
    for k in ("spot_diameter_um", "bin_size_um", "center_to_center_um"):
        if k in record:
            out[k] = float(record[k])
    return out


def deconvolve_spot_sample(
    spots: ad.AnnData,
    training_set: ad.AnnData,
    *,
    method: str,
    seed: int,
    max_cells_per_type: int,
    name: str,
) -> ad.AnnData:
    """Proportions of the training set's classes (``cell_type``, its CL ids) in every spot.

    ``training_set`` is :func:`~spatial_assets.platform.workflow.build_training_set`'s output on the
    sample's panel (raw counts in ``layers['counts']``, already Cap & Fill balanced; its CL ids in
    ``obs['cell_type_ontology_term_id']`` are the ones reported).
    """
    return deconvolve(
        spots,
        training_set,
        label_column=schema.CELL_TYPE,
        method=method,
        seed=seed,
        max_cells_per_type=max_cells_per_type,
        name=name,
    )


def labels_table(deconvolved: ad.AnnData) -> pd.DataFrame:
    """label, ontology id, reference cells and mean proportion of every class (one row per column of the table)."""
    labels = deconvolved.uns[UNS_KEY]["labels"]
    return pd.DataFrame(
        {
            "cell_type": [str(x) for x in labels["label"]],
            schema.CELL_TYPE_ONTOLOGY_ID: [str(x) for x in labels["ontology_term_id"]],
            "n_reference_cells": np.asarray(labels["n_reference_cells"], dtype=np.int64),
            "mean_proportion": np.asarray(labels["mean_proportion"], dtype=np.float64),
        }
    ).sort_values("mean_proportion", ascending=False, ignore_index=True)


def spot_domains(deconvolved: ad.AnnData, *, n_domains: int, seed: int) -> ad.AnnData:
    """Domains of a deconvolved spot sample: k-means of the proportions averaged over each spot and its
    lattice neighbours (``obsp['spatial_connectivities']`` is the grid, :func:`grid_graph`).

    Domains are numbered by size (``D0`` the largest) and each is named by its top class (highest
    mean proportion) in ``obs['domain_top_cell_type']``, which is what makes them comparable across
    samples (the k-means is per sample). A copy; ``deconvolved`` is not modified.
    """
    from sklearn.cluster import KMeans

    P = deconvolved.obsm[PROPORTIONS_KEY]
    props = np.asarray(P, dtype=np.float64)
    classes = [str(c) for c in P.columns]
    conn, dist = grid_graph(deconvolved)
    W = conn.tocsr().astype(np.float64)
    W.setdiag(1.0)
    deg = np.asarray(W.sum(axis=1)).ravel()
    smoothed = np.asarray(W @ props) / deg[:, None]
    k = int(max(1, min(n_domains, deconvolved.n_obs)))
    raw = KMeans(n_clusters=k, n_init=10, random_state=int(seed)).fit_predict(smoothed)
    order = np.argsort(-np.bincount(raw, minlength=k), kind="stable")
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    codes = rank[raw]
    names = [f"D{i}" for i in range(k)]
    top = {}
    for d, name in enumerate(names):
        members = codes == d
        top[name] = classes[int(np.argmax(props[members].mean(axis=0)))] if members.any() else ""
    out = deconvolved.copy()
    out.obsp["spatial_connectivities"], out.obsp["spatial_distances"] = conn, dist
    out.obs[SPOT_DOMAIN] = pd.Categorical.from_codes(codes, categories=names)
    out.obs[SPOT_DOMAIN_TOP_TYPE] = pd.Categorical([top[names[c]] for c in codes])
    out.uns["spot_domains"] = {
        "method": "k-means of the cell-type proportions averaged over each spot and its lattice neighbours",
        "n_domains": k,
        "seed": int(seed),
        "graph": "spot lattice (deconvolution.spots.grid_graph)",
        "n_edges": int(conn.nnz),
    }
    return out


def spot_domain_composition(spots: ad.AnnData, *, sample_id: str) -> pd.DataFrame:
    """Long table ``sample_id, domain, domain_top_cell_type, cell_type, cell_type_ontology_term_id, n_spots,
    fraction``: ``fraction`` is the mean proportion of the class over the domain's spots (sums to 1 per
    domain) — the spot counterpart of the cell samples' cells-per-type fraction."""
    props = np.asarray(spots.obsm[PROPORTIONS_KEY], dtype=np.float64)
    classes = [str(c) for c in spots.obsm[PROPORTIONS_KEY].columns]
    labels = labels_table(spots)
    ids = dict(zip(labels["cell_type"], labels[schema.CELL_TYPE_ONTOLOGY_ID]))
    domains = spots.obs[SPOT_DOMAIN].astype(str).to_numpy()
    tops = spots.obs[SPOT_DOMAIN_TOP_TYPE].astype(str).to_numpy()
    rows = []
    for name in spots.obs[SPOT_DOMAIN].cat.categories:
        members = domains == name
        if not members.any():
            continue
        mean = props[members].mean(axis=0)
        top = str(tops[members][0])
        rows += [(sample_id, str(name), top, c, ids.get(c, ""), int(members.sum()), float(v)) for c, v in zip(classes, mean)]
    return pd.DataFrame(
        rows,
        columns=["sample_id", "domain", SPOT_DOMAIN_TOP_TYPE, "cell_type", schema.CELL_TYPE_ONTOLOGY_ID, "n_spots", "fraction"],
    )


def dominant_counts(deconvolved: ad.AnnData) -> pd.Series:
    return deconvolved.obs[DOMINANT].astype(str).value_counts()


__all__ = [
    "SPOT_DOMAIN",
    "SPOT_DOMAIN_TOP_TYPE",
    "SPOT_LANDING_PREFIX",
    "deconvolve_spot_sample",
    "dominant_counts",
    "labels_table",
    "prepare_spot_sample",
    "read_landed_spots",
    "spot_domain_composition",
    "spot_domains",
    "spot_size",
]
