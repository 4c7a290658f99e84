"""Provenance building blocks (no Dagster): content hashes and library versions.

Every annotations object carries ``uns['provenance']``: which reference files (by hash) built which
training set (by content hash), which model (by sha256) was trained on it, and which run applied
it.  ``audit`` re-reads that chain from storage and compares each link with what storage holds
now, so a user can tell whether a call is still what the current references would produce.
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata as importlib_metadata
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp

#: ``uns`` key (h5ad) / ``DataFrame.attrs`` key (parquet) where a per-sample object records the
#: identity of each input it was computed from (what ``spatial-assets audit`` compares link by link)
LINEAGE = "lineage"

TRACKED_LIBRARIES = ("anndata", "numpy", "scipy", "scikit-learn", "celltypist", "scanpy", "dagster", "novae", "torch")


def library_versions(names: tuple[str, ...] = TRACKED_LIBRARIES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def content_hash(adata: Any, obs_columns: tuple[str, ...] = ()) -> str:
    """sha256 over the matrix, cell ids, gene ids and chosen obs columns.

    Independent of the h5ad encoding (compression, chunking, attribute order), so the same
    training set always has the same hash.
    """
    h = hashlib.sha256()
    h.update("\x1f".join(map(str, adata.obs_names)).encode())
    h.update(b"\x1e")
    h.update("\x1f".join(map(str, adata.var_names)).encode())
    X = adata.X
    if sp.issparse(X):
        X = X.tocsr()
        X.sort_indices()
        for part in (X.indptr, X.indices, X.data):
            h.update(np.ascontiguousarray(part).tobytes())
    else:
        h.update(np.ascontiguousarray(np.asarray(X)).tobytes())
    for col in obs_columns:
        if col in adata.obs:
            h.update(col.encode())
            h.update("\x1f".join(map(str, adata.obs[col].astype(str))).encode())
    return h.hexdigest()


def _to_builtin(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_builtin(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_to_builtin(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_provenance(h5ad_path: Any) -> dict[str, Any]:
    """Read ``uns['provenance']`` without loading the matrix."""
    import anndata as ad
    import h5py

    with h5py.File(h5ad_path, "r") as f:
        if "uns" not in f or "provenance" not in f["uns"]:
            raise ValueError(f"{h5ad_path}: no uns['provenance'] recorded")
        return _to_builtin(ad.io.read_elem(f["uns/provenance"]))
