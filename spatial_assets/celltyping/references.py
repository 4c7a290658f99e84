"""Read scRNA-seq references down to a gene panel, and combine several into one training set.

Atlases are large (10^5–10^6 cells × 30k genes) while a spatial panel has a few hundred genes, so a
reference is never loaded whole: the h5ad is opened with h5py and its count matrix is read in row
chunks, keeping only the panel columns of each chunk, so peak memory scales with the panel. (h5py
rather than ``read_h5ad(backed="r")`` because backed mode still loads every layer, ``raw`` and all obs
columns into memory.) Labels are taken as the authors wrote them (``original_label``); harmonising
them to the ontology is a later step.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from anndata.io import read_elem, sparse_dataset

from spatial_assets.core.ids import validate_id
from spatial_assets.core.normalization import NormalizationError, _normalize_matrix, is_count_matrix, plan_normalization
from spatial_assets.storage.objectstore import S3Settings, fetch_to_cache, head, is_s3_uri, sha256_file
from spatial_assets.core.schema import CELL_TYPE_ONTOLOGY_ID, COUNTS_LAYER, ORIGINAL_LABEL, REFERENCE_SOURCE

logger = logging.getLogger(__name__)


class ReferenceError(ValueError):
    """A reference file that cannot be used as given (names the file and what is wrong)."""


@dataclass
class ReferenceSpec:
    """One reference: where it is and which obs column holds its cell-type labels."""

    uri: str
    label_column: str
    name: str | None = None
    organism: str | None = None


#: Labels that mean "no label"; matched exactly (so "Unknown T cell" is kept).
DEFAULT_PLACEHOLDER_LABELS: tuple[str, ...] = (
    "unknown", "Unknown", "UNKNOWN", "unassigned", "Unassigned", "na", "NA", "N/A", "n/a",
    "none", "None", "null", "doublet", "Doublet", "low quality", "Low quality",
)  # fmt: skip

#: var columns that hold gene symbols when var_names are Ensembl ids (CellxGene: feature_name)
SYMBOL_COLUMNS: tuple[str, ...] = ("feature_name", "gene_symbols", "gene_symbol", "gene_name", "gene_names", "symbol")
#: where raw counts may live in an h5ad, in order of preference; "X" last
_COUNT_ELEMENTS: tuple[str, ...] = ("layers/counts", "layers/raw_counts", "layers/raw", "raw/X")
_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
#: dense on-disk matrices are read in blocks of at most this many elements (≈100 MB float32)
_DENSE_BLOCK_ELEMENTS = 25_000_000
#: sparse on-disk matrices are read in chunks of about this many stored values (~16 MB data + indices)
_SPARSE_CHUNK_NNZ = 2_000_000


def looks_like_ensembl(names: Sequence[str]) -> bool:
    """True when most names are Ensembl gene ids (ENSG…, ENSMUSG…, with or without version)."""
    names = [str(n) for n in names]
    if not names:
        return False
    return sum(bool(_ENSEMBL_RE.match(n)) for n in names) > len(names) / 2


def harmonize_gene_symbols(var: pd.DataFrame, var_names: Sequence[str]) -> list[str]:
    """Gene symbols for ``var_names``: Ensembl ids are replaced by a symbol column when there is one.

    Panels are written in symbols; CellxGene atlases index genes by Ensembl id and keep the symbol in
    ``var['feature_name']``. Ids with an empty/missing symbol keep the id.
    """
    names = [str(n) for n in var_names]
    if not looks_like_ensembl(names):
        return names
    for col in SYMBOL_COLUMNS:
        if col in var.columns:
            symbols = var[col]
            out = []
            for gid, sym in zip(names, symbols):
                ok = sym is not None and not (isinstance(sym, float) and np.isnan(sym)) and str(sym).strip() != ""
                out.append(str(sym) if ok else gid)
            return out
    return names


# --------------------------------------------------------------------------------------------
# low-level h5ad access


def _df_columns(group: h5py.Group) -> list[str]:
    return [str(c) for c in np.atleast_1d(group.attrs.get("column-order", []))]


def _df_index(group: h5py.Group) -> pd.Index:
    return pd.Index(np.asarray(read_elem(group[group.attrs["_index"]])).astype(str))


def _df_read(group: h5py.Group, columns: Sequence[str], index: pd.Index) -> pd.DataFrame:
    data = {c: read_elem(group[c]) for c in columns}
    return pd.DataFrame(data, index=index)


def _open_matrix(elem: Any) -> Any:
    if isinstance(elem, h5py.Dataset):
        return elem
    return sparse_dataset(elem)


def _matrix_format(mat: Any) -> str:
    return getattr(mat, "format", "dense")


def _read_panel_columns(mat: Any, cols: np.ndarray, chunk_size: int) -> sp.csr_matrix:
    """Columns ``cols`` (in that order) of an on-disk matrix as CSR, reading row chunks.

    Each chunk is cut to the panel before the next is read, so memory is one chunk of the full
    matrix plus the panel-sized result. CSC files are read column-wise instead (rows are scattered).
    """
    n_rows, n_cols = (int(s) for s in mat.shape)
    fmt = _matrix_format(mat)
    order = np.argsort(cols, kind="stable")
    sorted_cols = cols[order]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    if fmt == "csc":
        block = mat[:, sorted_cols]
        return sp.csr_matrix(block[:, inverse])
    if fmt == "dense":
        rows_per = max(1, min(chunk_size, _DENSE_BLOCK_ELEMENTS // max(n_cols, 1)))
        bounds = list(range(0, n_rows, rows_per)) + [n_rows]
    else:
        bounds = _sparse_row_bounds(mat, chunk_size)
    parts: list[sp.csr_matrix] = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        block = mat[start:stop]
        if sp.issparse(block):
            parts.append(sp.csr_matrix(block)[:, cols])
        else:
            parts.append(sp.csr_matrix(np.asarray(block)[:, cols]))
        del block
    if not parts:
        return sp.csr_matrix((0, cols.size), dtype=np.float32)
    out = vstack_csr(parts)
    out.sort_indices()
    return out


def _sparse_row_bounds(mat: Any, chunk_size: int) -> list[int]:
    """Row boundaries of chunks holding at most ``chunk_size`` rows and ~``_SPARSE_CHUNK_NNZ`` stored values.

    Bounding by stored values, not rows, keeps one chunk of a dense-ish atlas (many genes per cell)
    as small as one of a sparse one.
    """
    n_rows = int(mat.shape[0])
    group = getattr(mat, "group", None)
    if group is None or "indptr" not in group:
        return list(range(0, n_rows, chunk_size)) + [n_rows]
    indptr = np.asarray(group["indptr"][...], dtype=np.int64)
    bounds = [0]
    while bounds[-1] < n_rows:
        start = bounds[-1]
        by_nnz = int(np.searchsorted(indptr, indptr[start] + _SPARSE_CHUNK_NNZ, side="right")) - 1
        bounds.append(min(n_rows, start + chunk_size, max(by_nnz, start + 1)))
    return bounds


def vstack_csr(parts: list[sp.spmatrix]) -> sp.csr_matrix:
    """Row-stack CSR blocks, consuming ``parts`` (emptied) so peak memory is the result + one block.

    ``scipy.sparse.vstack`` keeps every input alive while it builds the output (2x the data).
    """
    parts[:] = [p if sp.isspmatrix_csr(p) else sp.csr_matrix(p) for p in parts]
    n_cols = parts[0].shape[1] if parts else 0
    nnz = sum(int(p.nnz) for p in parts)
    n_rows = sum(int(p.shape[0]) for p in parts)
    dtype = np.result_type(*[p.dtype for p in parts]) if parts else np.float32
    idx_dtype = np.int32 if max(nnz, n_cols) < np.iinfo(np.int32).max else np.int64
    data = np.empty(nnz, dtype=dtype)
    indices = np.empty(nnz, dtype=idx_dtype)
    indptr = np.empty(n_rows + 1, dtype=idx_dtype)
    indptr[0] = 0
    r = p = 0
    while parts:
        blk = parts.pop(0)
        blk.sum_duplicates()
        k, m = int(blk.nnz), int(blk.shape[0])
        data[p : p + k] = blk.data
        indices[p : p + k] = blk.indices
        indptr[r + 1 : r + m + 1] = blk.indptr[1:] + p
        r, p = r + m, p + k
        del blk
    return sp.csr_matrix((data[:p], indices[:p], indptr[: r + 1]), shape=(r, n_cols))


def _zero_overlap_message(file: str, panel: Sequence[str], ref_ids: Sequence[str], ref_symbols: Sequence[str]) -> str:
    panel_ex = ", ".join(list(panel)[:5])
    ref_ex = ", ".join(list(ref_symbols)[:5])
    ref_ens, panel_ens = looks_like_ensembl(ref_ids), looks_like_ensembl(panel)
    if ref_ens and not panel_ens and list(ref_ids) == list(ref_symbols):
        why = (
            f"the reference uses Ensembl ids (e.g. {ref_ex}) and has no symbol column "
            f"({', '.join(SYMBOL_COLUMNS)}) while the panel uses gene symbols (e.g. {panel_ex})"
        )
    elif panel_ens and not looks_like_ensembl(ref_symbols):
        why = f"the panel uses Ensembl ids (e.g. {panel_ex}) while the reference uses gene symbols (e.g. {ref_ex})"
    else:
        upper = {g.upper() for g in ref_symbols}
        n_ci = sum(g.upper() in upper for g in panel)
        why = f"panel e.g. {panel_ex}; reference e.g. {ref_ex}"
        if n_ci:
            why += f"; {n_ci} genes match ignoring case (human vs mouse symbols?)"
    return f"reference {file} shares no gene with the panel ({len(panel)} genes): {why}"


def check_reference_obs(uri: str, columns: Sequence[str], obs_names: pd.Index, label_column: str) -> None:
    """The label column exists (no auto-detect) and cell ids are unique; errors name the file."""
    available = list(columns)
    if label_column not in available:
        raise ReferenceError(
            f"label column {label_column!r} not found in obs of reference {uri}; available columns: {available}"
        )
    if obs_names.has_duplicates:
        dups = obs_names[obs_names.duplicated()].unique()[:5].tolist()
        raise ReferenceError(
            f"reference {uri} has {int(obs_names.duplicated().sum())} duplicate cell ids (e.g. {dups}); "
            "cell ids must be unique"
        )


def read_reference_subset(
    uri: str,
    genes: Sequence[str],
    *,
    label_column: str,
    chunk_size: int = 20_000,
    settings: S3Settings | None = None,
) -> AnnData:
    """The reference at ``uri`` restricted to the panel ``genes`` it has, read chunk-wise.

    X holds raw counts when the file has them (``layers['counts']``, ``layers['raw_counts']``,
    ``layers['raw']``, ``raw.X`` or X itself, verified by the integer test), else the file's X.
    Always CSR. obs keeps the label column and ``cell_type_ontology_term_id`` when present.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    try:
        path = Path(fetch_to_cache(uri, settings=settings))
    except FileNotFoundError as exc:
        raise ReferenceError(f"reference file not found: {uri}") from exc
    panel = list(dict.fromkeys(str(g) for g in genes))
    if not panel:
        raise ReferenceError(f"no panel genes given for reference {uri}")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise ReferenceError(f"reference {uri} is not a readable h5ad (HDF5) file: {exc}") from exc
    with fh as f:
        if not isinstance(f.get("obs"), h5py.Group) or not isinstance(f.get("var"), h5py.Group):
            raise ReferenceError(f"reference {uri} is not an AnnData >= 0.7 h5ad file (obs/var groups missing)")
        obs_group = f["obs"]
        obs_names = _df_index(obs_group)
        available = _df_columns(obs_group)
        check_reference_obs(uri, available, obs_names, label_column)

        # counts source: first candidate that passes the integer test, else X as it is
        source, mat = "X", None
        for name in _COUNT_ELEMENTS:
            if name in f:
                candidate = _open_matrix(f[name])
                if is_count_matrix(candidate):
                    source, mat = name, candidate
                    break
        if mat is None:
            if "X" not in f:
                raise ReferenceError(f"reference {uri} has no X matrix")
            mat = _open_matrix(f["X"])
        counts_source = source if source != "X" or is_count_matrix(mat) else ""

        var_group = f["raw/var"] if source == "raw/X" else f["var"]
        var_ids = _df_index(var_group)
        sym_cols = [c for c in SYMBOL_COLUMNS if c in _df_columns(var_group)]
        var_df = _df_read(var_group, sym_cols[:1], var_ids)
        symbols = harmonize_gene_symbols(var_df, var_ids)
        if int(mat.shape[1]) != len(symbols):
            raise ReferenceError(f"reference {uri}: {source} has {mat.shape[1]} columns but var has {len(symbols)} genes")
        position: dict[str, int] = {}
        for i, s in enumerate(symbols):
            position.setdefault(s, i)  # duplicated symbols: the first column wins
        present = [g for g in panel if g in position]
        if not present:
            raise ReferenceError(_zero_overlap_message(str(uri), panel, list(var_ids), symbols))
        cols = np.array([position[g] for g in present], dtype=np.int64)
        X = _read_panel_columns(mat, cols, chunk_size)

        keep_cols = [label_column] + [c for c in (CELL_TYPE_ONTOLOGY_ID,) if c in available and c != label_column]
        obs = _df_read(obs_group, keep_cols, obs_names)

    var = pd.DataFrame({"feature_id": np.asarray(var_ids)[cols].astype(str)}, index=pd.Index(present))
    out = AnnData(X=X, obs=obs, var=var)
    out.uns["reference_read"] = {
        "uri": str(uri),
        "local_path": str(path),
        "matrix_source": source,
        "counts_source": counts_source,
        "label_column": label_column,
        "n_panel_genes": len(panel),
        "n_genes_found": len(present),
        "gene_ids_were_ensembl": looks_like_ensembl(list(var_ids)),
    }
    return out


# --------------------------------------------------------------------------------------------
# combining


def reference_fingerprint(uri: str, settings: S3Settings | None = None) -> dict[str, Any]:
    """Lineage record: sha256 of the bytes actually read (the cached download for S3) + etag/size."""
    try:
        path = fetch_to_cache(uri, settings=settings)
    except FileNotFoundError as exc:
        raise ReferenceError(f"reference file not found: {uri}") from exc
    info = head(str(uri), settings=settings) if is_s3_uri(uri) else head(str(path))
    return {
        "uri": str(uri),
        "etag": str(info["etag"]),
        "size": int(info["size"]),
        "sha256": sha256_file(path),
        "local_path": str(path),
    }


def _source_names(specs: Sequence[ReferenceSpec]) -> list[str]:
    """Unique, id-safe source names: explicit name or file stem; repeats become name_2, name_3…"""
    bases = []
    for spec in specs:
        base = spec.name if spec.name else PurePosixPath(str(spec.uri)).stem
        bases.append(validate_id(base, kind="reference name"))
    taken = set()
    out = []
    for base in bases:
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        out.append(name)
    return out


def _label_filter(
    labels: pd.Series, placeholders: set[str], min_cells: int
) -> tuple[np.ndarray, list[str], list[int], list[str]]:
    """Keep-mask plus (label, count, reason) of everything removed, in that order of rules."""
    missing = labels.isna().to_numpy()
    as_str = pd.Series(labels.astype(object).to_numpy(), dtype=object).where(~missing, "").astype(str)
    placeholder = as_str.isin(placeholders).to_numpy() & ~missing
    removed_labels: list[str] = []
    removed_counts: list[int] = []
    reasons: list[str] = []
    if missing.any():
        removed_labels.append("<missing>")
        removed_counts.append(int(missing.sum()))
        reasons.append("missing")
    for lab, n in sorted(as_str[placeholder].value_counts().items()):
        removed_labels.append(str(lab))
        removed_counts.append(int(n))
        reasons.append("placeholder")
    candidates = ~missing & ~placeholder
    counts = as_str[candidates].value_counts()
    small = sorted(str(lab) for lab in counts.index[counts < min_cells])
    for lab in small:
        removed_labels.append(lab)
        removed_counts.append(int(counts[lab]))
        reasons.append(f"below_min_cells_per_type({min_cells})")
    keep = candidates & ~as_str.isin(small).to_numpy()
    return keep, removed_labels, removed_counts, reasons


def _stack(mats: list[Any]) -> Any:
    """Row-stack, consuming ``mats`` (emptied) to keep peak memory near the result's size."""
    if any(sp.issparse(m) for m in mats):
        return vstack_csr(mats)
    out = np.vstack(mats)
    mats.clear()
    return out


def combine_references(
    specs: Sequence[ReferenceSpec],
    panel_genes: Sequence[str],
    *,
    min_cells_per_type: int = 3,
    placeholder_labels: Sequence[str] = DEFAULT_PLACEHOLDER_LABELS,
    settings: S3Settings | None = None,
    seed: int = 0,
) -> AnnData:
    """One log1p-10k training set from several references over the genes they all share.

    Filtering: missing and placeholder labels (exact match) go first, then every label with fewer
    than ``min_cells_per_type`` cells *within its own reference* — each reference's labels are its
    own vocabulary until harmonised, so counts are never pooled across sources. Each reference is
    normalized over the shared genes (library size = sum over those genes) so all sources are on
    the same scale. ``layers['counts']`` is kept only when every reference had raw counts.
    """
    if not specs:
        raise ReferenceError("no references given")
    if min_cells_per_type < 1:
        raise ValueError(f"min_cells_per_type must be >= 1, got {min_cells_per_type}")
    organisms = {s.organism for s in specs if s.organism}
    if len(organisms) > 1:
        raise ReferenceError(f"references of different organisms cannot be combined by gene symbol: {sorted(organisms)}")
    panel = list(dict.fromkeys(str(g) for g in panel_genes))
    names = _source_names(specs)
    placeholders = set(placeholder_labels)

    subsets = [
        read_reference_subset(s.uri, panel, label_column=s.label_column, settings=settings) for s in specs
    ]
    present_sets = [set(a.var_names) for a in subsets]
    shared = [g for g in panel if all(g in p for p in present_sets)]
    if not shared:
        found = {n: len(p) for n, p in zip(names, present_sets)}
        raise ReferenceError(f"the references share no panel gene (panel genes found per reference: {found})")

    x_parts: list[Any] = []
    count_parts: list[Any] = []
    obs_parts: list[pd.DataFrame] = []
    info: dict[str, Any] = {}
    for i, (spec, name) in enumerate(zip(specs, names)):
        sub = subsets[i]
        subsets[i] = None  # type: ignore[call-overload]  # each subset is freed once its part is built
        if list(sub.var_names) != shared:
            sub = sub[:, shared].copy()
        read_info = dict(sub.uns.pop("reference_read"))
        n_before = int(sub.n_obs)
        # normalise the matrix we just read (we own it: no defensive copies); same detection and
        # refusals as ensure_normalized
        try:
            plan = plan_normalization(sub, seed=seed)
        except NormalizationError as exc:
            raise NormalizationError(f"reference {spec.uri} ({name}): {exc}") from exc
        Xn = _normalize_matrix(plan.matrix, plan.method, plan.target_sum)
        counts = plan.matrix if plan.status.raw_source is not None else None
        keep, rm_labels, rm_counts, rm_reasons = _label_filter(sub.obs[spec.label_column], placeholders, min_cells_per_type)
        if not keep.any():
            removed = ", ".join(f"{lab!r} ×{n} ({why})" for lab, n, why in zip(rm_labels, rm_counts, rm_reasons))
            raise ReferenceError(
                f"reference {spec.uri} ({name}) has no cells left after label filtering of column "
                f"{spec.label_column!r}; removed: {removed}"
            )
        sub_obs = sub.obs
        norm_record = plan.record()
        del sub, plan
        if not keep.all():
            Xn = Xn[keep]
            counts = counts[keep] if counts is not None else None
            sub_obs = sub_obs[keep]
        obs = pd.DataFrame(
            {
                ORIGINAL_LABEL: sub_obs[spec.label_column].astype(str).to_numpy(),
                REFERENCE_SOURCE: name,
            },
            index=sub_obs.index,
        )
        if CELL_TYPE_ONTOLOGY_ID in sub_obs.columns and spec.label_column != CELL_TYPE_ONTOLOGY_ID:
            obs[CELL_TYPE_ONTOLOGY_ID] = sub_obs[CELL_TYPE_ONTOLOGY_ID].astype(object).to_numpy()
        x_parts.append(Xn)
        count_parts.append(sp.csr_matrix(counts, dtype=np.float32) if counts is not None and sp.issparse(counts) else counts)
        obs_parts.append(obs)
        fp = reference_fingerprint(spec.uri, settings=settings)
        info[name] = {
            "uri": str(spec.uri),
            "sha256": fp["sha256"],
            "etag": fp["etag"],
            "size": fp["size"],
            "label_column": spec.label_column,
            "organism": spec.organism or "",
            "counts_source": read_info["counts_source"],
            "n_genes_found": int(read_info["n_genes_found"]),
            "n_cells_before": n_before,
            "n_cells_after": int(obs.shape[0]),
            "n_labels_after": int(obs[ORIGINAL_LABEL].nunique()),
            "removed_labels": rm_labels,
            "removed_counts": rm_counts,
            "removed_reasons": rm_reasons,
            "normalization": norm_record,
        }
        logger.info("reference %s: %d → %d cells, %d genes", name, n_before, obs.shape[0], len(shared))

    labels = pd.unique(np.concatenate([o[ORIGINAL_LABEL].to_numpy() for o in obs_parts]))
    if len(labels) < 2:
        raise ReferenceError(
            f"the combined references have a single cell type after filtering ({labels[0]!r}); "
            "a classifier needs at least 2 classes"
        )

    obs = pd.concat(obs_parts, axis=0, join="outer")
    if obs.index.has_duplicates:
        obs.index = pd.Index([f"{s}:{i}" for s, i in zip(obs[REFERENCE_SOURCE], obs.index)])
    obs[ORIGINAL_LABEL] = pd.Categorical(obs[ORIGINAL_LABEL])
    obs[REFERENCE_SOURCE] = pd.Categorical(obs[REFERENCE_SOURCE], categories=names)
    keep_counts = all(c is not None for c in count_parts)
    layers = {COUNTS_LAYER: _stack(count_parts)} if keep_counts else {}
    count_parts.clear()
    out = AnnData(
        X=_stack(x_parts),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(shared)),
        layers=layers,
    )
    out.uns["references"] = info
    out.uns["reference_combination"] = {
        "n_panel_genes": len(panel),
        "n_shared_genes": len(shared),
        "min_cells_per_type": int(min_cells_per_type),
        "min_cells_rule": "per label within each reference_source",
        "placeholder_labels": list(placeholder_labels),
        "counts_layer": bool(keep_counts),
        "target_sum": 1e4,
        "seed": int(seed),
    }
    return out
