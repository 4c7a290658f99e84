"""The scRNA-seq reference of a deconvolution: raw counts over the genes shared with the spots.

Same reference and same panel logic as cell typing, so a spot sample and a cell sample of the same
study are explained by the same classes: the registered reference file is read down to the spot
panel (``celltyping.references.read_reference_subset``, chunk-wise, so an atlas is never loaded
whole), raw counts are found by ``core.normalization`` (never trusted from metadata), labels are mapped
to Cell Ontology terms by ``celltyping.ontology`` and cells are balanced by the training set's Cap &
Fill (``celltyping.balancing``). Deconvolution models counts, so a reference without raw counts is
refused rather than guessed back from log values.

Unlike cell typing (where a tiny class is dropped from training), a class with too few cells is an
error here: its mean profile would be noise, and every spot's proportions depend on every profile.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from spatial_assets.celltyping.balancing import cap_and_fill
from spatial_assets.celltyping.ontology import apply_ontology
from spatial_assets.celltyping.references import (
    DEFAULT_PLACEHOLDER_LABELS,
    ReferenceError,
    harmonize_gene_symbols,
    read_reference_subset,
)
from spatial_assets.core import schema
from spatial_assets.core.normalization import NormalizationError, plan_normalization

#: a class needs at least this many reference cells for a usable mean profile
MIN_CELLS_PER_TYPE = 5
#: reference cells kept per class (Cap & Fill), as for the cell-typing training set
MAX_CELLS_PER_TYPE = 5000


class DeconvolutionInputError(ValueError):
    """Spots or reference that cannot be deconvolved as given (names the file, column, gene or class)."""


@dataclass
class DeconvolutionReference:
    """Balanced reference counts over the shared genes, with labels and their Cell Ontology ids.

    ``counts`` is cells × ``genes`` (raw counts, CSR, float32); ``labels`` holds the class of every
    row; ``classes`` is the column order of every proportion table.
    """

    counts: sp.csr_matrix
    labels: np.ndarray
    genes: list[str]
    classes: list[str]
    ontology_ids: dict[str, str]
    source: str
    record: dict[str, Any] = field(default_factory=dict)

    def class_codes(self) -> np.ndarray:
        return pd.Categorical(self.labels, categories=self.classes).codes.astype(np.int64)

    def mean_profiles(self) -> np.ndarray:
        """(K, G) per-class mean raw counts per cell: what a spot of one cell of each class looks like."""
        codes = self.class_codes()
        K = len(self.classes)
        ind = sp.csr_matrix((np.ones(codes.size), (codes, np.arange(codes.size))), shape=(K, codes.size))
        sums = np.asarray((ind @ self.counts).todense(), dtype=np.float64)
        n = np.bincount(codes, minlength=K).astype(np.float64)
        return sums / n[:, None]

    def excess_variance(self) -> np.ndarray:
        """(K, G) per-class variance of counts per cell beyond Poisson (variance − mean, ≥ 0)."""
        codes = self.class_codes()
        K = len(self.classes)
        ind = sp.csr_matrix((np.ones(codes.size), (codes, np.arange(codes.size))), shape=(K, codes.size))
        n = np.bincount(codes, minlength=K).astype(np.float64)[:, None]
        m1 = np.asarray((ind @ self.counts).todense(), dtype=np.float64) / n
        sq = self.counts.multiply(self.counts).tocsr()
        m2 = np.asarray((ind @ sq).todense(), dtype=np.float64) / n
        var = (m2 - m1**2) * n / np.maximum(n - 1, 1)
        return np.maximum(var - m1, 0.0)

    def cells_per_class(self) -> dict[str, int]:
        n = np.bincount(self.class_codes(), minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, n)}


def _shared_genes(panel: Sequence[str], ref_genes: Sequence[str], *, reference: str, spots: str) -> list[str]:
    have = set(ref_genes)
    shared = [g for g in panel if g in have]
    if not shared:
        upper = {str(g).upper() for g in ref_genes}
        n_ci = sum(str(g).upper() in upper for g in panel)
        hint = f"; {n_ci} match ignoring case (human vs mouse symbols?)" if n_ci else ""
        raise DeconvolutionInputError(
            f"reference {reference} shares no gene with the spot table {spots} "
            f"(spots e.g. {list(panel)[:5]}, reference e.g. {list(ref_genes)[:5]}){hint}"
        )
    return shared


def _counts_of(adata: AnnData, genes: list[str], reference: str) -> tuple[sp.csr_matrix, str]:
    """Raw counts of ``genes`` from wherever detection finds them (layers, raw.X, X)."""
    try:
        plan = plan_normalization(adata, genes)
    except NormalizationError as exc:
        raise DeconvolutionInputError(f"reference {reference}: {exc}") from exc
    if plan.status.raw_source is None:
        raise DeconvolutionInputError(
            f"reference {reference} has no raw counts ({plan.status.describe()}; looked in layers['counts'], "
            "layers['raw_counts'], layers['raw'], raw.X and X): deconvolution models counts"
        )
    M = plan.matrix
    if plan.cols is not None:
        M = M[:, plan.cols]
    M = sp.csr_matrix(M, dtype=np.float32)
    return M, plan.status.raw_source


def _label_rows(
    labels: pd.Series, placeholders: set[str], min_cells: int, *, reference: str, label_column: str
) -> tuple[np.ndarray, dict[str, int]]:
    """Rows to keep (labelled, not a placeholder) and what was removed; too-small classes raise."""
    missing = labels.isna().to_numpy()
    as_str = labels.astype(object).where(~missing, "").astype(str).str.strip()
    empty = (as_str == "").to_numpy() & ~missing
    placeholder = as_str.isin(placeholders).to_numpy()
    keep = ~missing & ~empty & ~placeholder
    removed = {"<missing>": int(missing.sum() + empty.sum())}
    removed.update({str(k): int(v) for k, v in as_str[placeholder].value_counts().items()})
    counts = as_str[keep].value_counts()
    small = counts[counts < min_cells]
    if len(small):
        listed = ", ".join(f"{k!r} ({v} cells)" for k, v in sorted(small.items()))
        raise DeconvolutionInputError(
            f"reference {reference}: column {label_column!r} has classes with fewer than {min_cells} cells: "
            f"{listed}; a mean profile from so few cells is noise — merge or remove them, or pass them as "
            "placeholder labels"
        )
    if counts.size < 2:
        raise DeconvolutionInputError(
            f"reference {reference}: column {label_column!r} has {counts.size} usable class(es) "
            f"({list(counts.index)}); deconvolution needs at least 2"
        )
    return keep, {k: v for k, v in removed.items() if v}


def _ontology_ids(labels: np.ndarray, native: pd.Series | None, overrides: dict | None) -> dict[str, str]:
    """label → CL id (``unknown`` when unmapped), through the cell-typing ontology mapper."""
    obs = pd.DataFrame({"_label": pd.Categorical(labels)}, index=pd.Index([str(i) for i in range(len(labels))]))
    if native is not None:
        obs[schema.CELL_TYPE_ONTOLOGY_ID] = native.astype(object).to_numpy()
    tiny = AnnData(obs=obs)
    _, table = apply_ontology(tiny, label_column="_label", overrides=overrides)
    table = table.sort_values("n_cells", ascending=False, kind="stable")
    out: dict[str, str] = {}
    for lab, tid in zip(table["label"], table["ontology_term_id"]):
        out.setdefault(str(lab), str(tid))
    return out


def prepare_reference(
    reference: AnnData | str | os.PathLike,
    genes: Sequence[str],
    *,
    label_column: str,
    spots_name: str = "spots",
    placeholder_labels: Sequence[str] = DEFAULT_PLACEHOLDER_LABELS,
    min_cells_per_type: int = MIN_CELLS_PER_TYPE,
    max_cells_per_type: int = MAX_CELLS_PER_TYPE,
    ontology_overrides: dict[str, str | None] | None = None,
    seed: int = 0,
) -> DeconvolutionReference:
    """Reference counts over the spot ``genes`` it has, labels checked, CL ids mapped, Cap & Fill balanced.

    ``reference`` is a registered reference file (path or ``s3://``; read chunk-wise down to
    ``genes``) or an AnnData — a raw reference or a cell-typing training set (raw counts in
    ``layers['counts']``, ``obs['reference_source']`` balanced per source). Cells whose label is
    missing or a placeholder are left out; a class with fewer than ``min_cells_per_type`` cells is
    an error naming it.
    """
    if int(min_cells_per_type) < 1:
        raise DeconvolutionInputError(f"min_cells_per_type must be >= 1, got {min_cells_per_type}")
    panel = list(dict.fromkeys(str(g) for g in genes))
    if isinstance(reference, AnnData):
        name = str(reference.uns.get("source_uri", reference.filename or "<in-memory reference>"))
        if label_column not in reference.obs.columns:
            raise DeconvolutionInputError(
                f"label column {label_column!r} not found in obs of reference {name}; "
                f"available columns: {list(reference.obs.columns)}"
            )
        symbols = harmonize_gene_symbols(reference.var, reference.var_names)
        shared = _shared_genes(panel, symbols, reference=name, spots=spots_name)
        position: dict[str, int] = {}
        for i, s in enumerate(symbols):
            position.setdefault(s, i)
        sub = reference[:, [position[g] for g in shared]]
        sub = AnnData(X=sub.X, obs=sub.obs, var=pd.DataFrame(index=pd.Index(shared)), layers=dict(sub.layers.items()))
        counts, counts_source = _counts_of(sub, shared, name)
        obs = reference.obs
    else:
        name = str(reference)
        try:
            sub = read_reference_subset(name, panel, label_column=label_column)
        except ReferenceError as exc:
            raise DeconvolutionInputError(str(exc)) from exc
        shared = [str(g) for g in sub.var_names]
        counts_source = str(sub.uns["reference_read"]["counts_source"])
        if not counts_source:
            _counts_of(sub, shared, name)  # no raw counts in the file: raises, saying what X looks like
        counts = sp.csr_matrix(sub.X, dtype=np.float32)
        obs = sub.obs
    if counts.nnz and (counts.data.min() < 0 or not np.isfinite(counts.data).all()):
        raise DeconvolutionInputError(f"reference {name}: counts have negative or non-finite values")

    keep, removed = _label_rows(
        obs[label_column], set(placeholder_labels), int(min_cells_per_type), reference=name, label_column=label_column
    )
    labels = obs[label_column].astype(object).astype(str).str.strip().to_numpy()[keep]
    rows = np.flatnonzero(keep)
    counts = counts[rows] if rows.size != counts.shape[0] else counts
    native = obs[schema.CELL_TYPE_ONTOLOGY_ID].iloc[rows] if schema.CELL_TYPE_ONTOLOGY_ID in obs.columns else None
    source_col = schema.REFERENCE_SOURCE if schema.REFERENCE_SOURCE in obs.columns else None

    bal_obs = pd.DataFrame({"label": labels}, index=pd.Index([str(i) for i in range(rows.size)]))
    if source_col:
        bal_obs[source_col] = obs[source_col].astype(str).to_numpy()[rows]
    balanced = cap_and_fill(
        AnnData(X=counts, obs=bal_obs),
        label_column="label",
        source_column=source_col,
        max_cells_per_type=int(max_cells_per_type),
        seed=seed,
    )
    pick = balanced.obs_names.astype(int).to_numpy()
    labels = labels[pick]
    counts = sp.csr_matrix(balanced.X, dtype=np.float32)
    classes = sorted(set(labels))
    ontology = _ontology_ids(labels, None if native is None else native.iloc[pick], ontology_overrides)
    record = {
        "source": name,
        "label_column": label_column,
        "counts_source": counts_source,
        "n_genes_shared": len(shared),
        "n_panel_genes": len(panel),
        "n_cells_used": int(counts.shape[0]),
        "removed_labels": removed,
        "min_cells_per_type": int(min_cells_per_type),
        "max_cells_per_type": int(max_cells_per_type),
        "balancing": "cap_and_fill" + (f" per {source_col}" if source_col else ""),
    }
    return DeconvolutionReference(
        counts=counts,
        labels=labels,
        genes=shared,
        classes=classes,
        ontology_ids={c: ontology.get(c, schema.UNASSIGNED_ONTOLOGY_ID) for c in classes},
        source=name,
        record=record,
    )
