"""Detect what scale an expression matrix is on, and bring it to log1p(counts per 10k).

Classifiers trained on one scale and applied to another fail silently (scores shift, accuracy
drops, nothing raises), and public atlases ship every variant: raw UMIs in ``X``, raw counts hidden
in ``layers`` or ``.raw``, log1p of counts-per-10k, log1p CPM, z-scores, and linear per-volume values
(MERFISH). So the state is measured from the data, never trusted from metadata, and anything that
cannot be turned into log1p-10k faithfully is refused with a message that says what was seen.

This is the one place the scale is detected and log1p-10k applied: cell typing uses
:func:`ensure_normalized` / :func:`plan_normalization`; the domain engines, domain annotation, the Novae
engine and the plots use :func:`log_normalized` / :func:`log_normalized_columns` (same detection, the
matrix only). Nobody else re-implements an "already logged?" test.

Detection only ever reads a random subset of rows, in bounded blocks, so it is cheap on large and
on backed (h5py / anndata sparse dataset) matrices and never densifies the whole matrix.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from spatial_assets.core.schema import COUNTS_LAYER

logger = logging.getLogger(__name__)

#: Where raw counts are looked for, in order of preference (``"X"`` is tried last).
RAW_CANDIDATES: tuple[str, ...] = ("layers['counts']", "layers['raw_counts']", "layers['raw']", "raw.X")
X_STATES: tuple[str, ...] = ("raw", "log1p_10k", "log1p_cpm", "log1p_other", "linear", "negative", "unknown")

INTEGER_TOL = 1e-6
INTEGER_MIN_FRACTION = 0.95
#: log1p(1e10) ≈ 23: anything larger than this cannot be a log1p of a per-cell normalized count.
LOG_MAX_VALUE = 25.0
BAND_10K = (8e3, 12e3)
BAND_CPM = (0.5e6, 2e6)
#: elements per block read while sampling (≈ 32 MB of float64 for dense matrices)
_BLOCK_ELEMENTS = 4_000_000
#: a ratio to the row minimum above this is too imprecise to test for integrality
_RATIO_MAX = 100.0
_RATIO_TOL = 1e-2
_MIN_RATIO_EVIDENCE = 50


class NormalizationError(ValueError):
    """The matrix is on a scale that cannot be turned into log1p(counts per 10k) faithfully."""


@dataclass
class NormalizationStatus:
    """What :func:`detect_normalization` saw; ``to_dict`` is what goes into lineage metadata."""

    raw_source: str | None
    x_state: str
    integer_fraction: float
    median_row_sum: float | None
    n_sampled: int
    n_rows_sampled: int = 0
    max_value: float | None = None
    #: fraction of within-row ratios expm1(x)/min that are integers (log1p of scaled counts ≈ 1)
    log_count_structure: float | None = None
    #: fraction of within-row ratios x/min that are integers (linear scaled counts ≈ 1)
    linear_count_structure: float | None = None

    @property
    def is_usable(self) -> bool:
        """True when :func:`ensure_normalized` can produce log1p-10k without ``unsafe_force``."""
        return self.raw_source is not None or self.x_state in ("log1p_10k", "linear")

    def to_dict(self) -> dict[str, Any]:
        """JSON/h5ad-safe dict (``None`` becomes ``""`` or NaN, which h5ad can store)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value is None:
                value = "" if key == "raw_source" else float("nan")
            out[key] = value
        out["is_usable"] = self.is_usable
        return out

    def describe(self) -> str:
        """One human sentence about X, used in error messages."""
        if self.x_state in ("log1p_10k", "log1p_cpm", "log1p_other"):
            what = {"log1p_10k": "log1p counts per 10k", "log1p_cpm": "log1p CPM", "log1p_other": "log1p of an unknown scale"}
            return f"X looks like {what[self.x_state]} (median expm1 row sum {_fmt(self.median_row_sum)})"
        if self.x_state == "negative":
            return "X has negative values (scaled / z-scored data)"
        if self.x_state == "linear":
            return f"X looks linear and non-integer (median row sum {_fmt(self.median_row_sum)})"
        if self.x_state == "raw":
            return f"X looks like raw counts (median row sum {_fmt(self.median_row_sum)})"
        return (
            f"X is on an unrecognised scale (max {_fmt(self.max_value)}, integer fraction {self.integer_fraction:.2f}, "
            f"median expm1 row sum {_fmt(self.median_row_sum)})"
        )


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.1e}"


# --------------------------------------------------------------------------------------------
# sampling


def _n_rows_cols(X: Any) -> tuple[int, int]:
    shape = X.shape
    return int(shape[0]), int(shape[1])


def _read_rows(X: Any, rows: np.ndarray) -> sp.csr_matrix:
    """Rows ``rows`` (sorted) of any matrix-like as CSR: scipy, numpy, h5py, anndata sparse datasets."""
    if sp.issparse(X):
        block = X[rows]
    elif isinstance(X, np.ndarray):
        block = X[rows]
    else:  # h5py.Dataset, anndata backed sparse dataset, array-likes: sorted fancy indexing works
        block = X[rows]
        if hasattr(block, "compute"):  # dask
            block = block.compute()
    if sp.issparse(block):
        return sp.csr_matrix(block)
    return sp.csr_matrix(np.asarray(block))


def _iter_row_blocks(X: Any, rows: np.ndarray) -> Iterator[sp.csr_matrix]:
    _, n_cols = _n_rows_cols(X)
    per_block = max(1, min(10_000, _BLOCK_ELEMENTS // max(n_cols, 1)))
    for start in range(0, len(rows), per_block):
        yield _read_rows(X, rows[start : start + per_block])


def _choose_rows(n_obs: int, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    if n_obs <= n_rows:
        return np.arange(n_obs)
    return np.sort(rng.choice(n_obs, size=n_rows, replace=False))


def _ratio_counts(data: np.ndarray, indptr: np.ndarray) -> tuple[int, int]:
    """(integer-like, tested) among within-row ratios value / row minimum, ratio in (1, 100].

    Counts that were scaled per cell (normalize_total, per-volume) keep this structure: every value
    is an integer multiple of the smallest one in its row. Continuous data does not.
    """
    lengths = np.diff(indptr)
    keep = lengths > 0
    if not keep.any() or data.size == 0:
        return 0, 0
    positive = np.where(data > 0, data, np.inf)
    starts = indptr[:-1][keep]
    mins = np.minimum.reduceat(positive, starts)
    with np.errstate(invalid="ignore", divide="ignore"):  # rows without positive values: inf/inf
        ratios = positive / np.repeat(mins, lengths[keep])
    tested = np.isfinite(ratios) & (ratios > 1 + 1e-3) & (ratios <= _RATIO_MAX)
    r = ratios[tested]
    return int(np.sum(np.abs(r - np.round(r)) < _RATIO_TOL)), int(r.size)


@dataclass
class _Stats:
    n_rows: int
    values: np.ndarray  # uniform random sample of non-zero values
    min_value: float | None
    max_value: float | None
    row_sums: np.ndarray  # non-zero rows only
    expm1_row_sums: np.ndarray
    log_struct: tuple[int, int]
    lin_struct: tuple[int, int]

    @property
    def integer_fraction(self) -> float:
        if self.values.size == 0:
            return 0.0
        return float(np.mean(np.abs(self.values - np.round(self.values)) <= INTEGER_TOL))


def _sample_stats(X: Any, *, n_sample: int, seed: int, with_rows: bool = True) -> _Stats:
    """One pass over a random row subset: value sample, extremes, row sums, count structure."""
    rng = np.random.default_rng(seed)
    n_obs, _ = _n_rows_cols(X)
    n_rows = max(200, n_sample // 5)
    rows = _choose_rows(n_obs, n_rows, rng)
    keys = np.empty(0)
    vals = np.empty(0)
    vmin, vmax = np.inf, -np.inf
    sums: list[np.ndarray] = []
    esums: list[np.ndarray] = []
    log_ok = log_n = lin_ok = lin_n = 0
    for block in _iter_row_blocks(X, rows):
        # own copy in float64: never touch the caller's arrays; explicit zeros are not "values"
        block = sp.csr_matrix(
            (np.asarray(block.data, dtype=np.float64), block.indices.copy(), block.indptr.copy()), shape=block.shape
        )
        block.sum_duplicates()
        block.eliminate_zeros()
        data = block.data
        if data.size:
            vmin = min(vmin, float(data.min()))
            vmax = max(vmax, float(data.max()))
            # reservoir by random keys: the n_sample smallest keys are a uniform sample without replacement
            k = rng.random(data.size)
            keys = np.concatenate([keys, k])
            vals = np.concatenate([vals, data])
            if keys.size > n_sample:
                sel = np.argpartition(keys, n_sample - 1)[:n_sample]
                keys, vals = keys[sel], vals[sel]
        if with_rows:
            rs = np.asarray(block.sum(axis=1)).ravel()
            e = np.expm1(np.clip(data, None, 700.0))
            es = np.asarray(sp.csr_matrix((e, block.indices, block.indptr), shape=block.shape).sum(axis=1)).ravel()
            nonzero_rows = np.diff(block.indptr) > 0
            sums.append(rs[nonzero_rows])
            esums.append(es[nonzero_rows])
            a, b = _ratio_counts(data, block.indptr)
            lin_ok, lin_n = lin_ok + a, lin_n + b
            if vmax <= LOG_MAX_VALUE:
                a, b = _ratio_counts(e, block.indptr)
                log_ok, log_n = log_ok + a, log_n + b
    return _Stats(
        n_rows=int(rows.size),
        values=vals,
        min_value=None if not np.isfinite(vmin) else vmin,
        max_value=None if not np.isfinite(vmax) else vmax,
        row_sums=np.concatenate(sums) if sums else np.empty(0),
        expm1_row_sums=np.concatenate(esums) if esums else np.empty(0),
        log_struct=(log_ok, log_n),
        lin_struct=(lin_ok, lin_n),
    )


def _looks_like_counts(stats: _Stats) -> bool:
    return (
        stats.values.size > 0
        and stats.min_value is not None
        and stats.min_value >= 0
        and stats.integer_fraction > INTEGER_MIN_FRACTION
    )


def _fraction(pair: tuple[int, int]) -> float | None:
    ok, n = pair
    return ok / n if n >= _MIN_RATIO_EVIDENCE else None


def _median(x: np.ndarray) -> float | None:
    return float(np.median(x)) if x.size else None


def _raw_candidates(adata: AnnData) -> Iterator[tuple[str, Any]]:
    for name in ("counts", "raw_counts", "raw"):
        if name in adata.layers:
            yield f"layers['{name}']", adata.layers[name]
    if adata.raw is not None:
        # raw.X only helps if it covers every gene of X (raw.var may hold more genes, never fewer)
        if pd.Index(adata.var_names).isin(adata.raw.var_names).all():
            yield "raw.X", adata.raw.X
        else:
            logger.info("raw.X ignored as a counts source: it lacks some of the genes in var_names")


def is_count_matrix(X: Any, *, n_sample: int = 10_000, seed: int = 0) -> bool:
    """The raw-count test of :func:`detect_normalization` for one matrix (in memory or backed)."""
    return _looks_like_counts(_sample_stats(X, n_sample=n_sample, seed=seed, with_rows=False))


def _classify_x(stats: _Stats) -> tuple[str, float | None]:
    """x_state and the row-sum median that goes with it."""
    if stats.values.size == 0:
        return "unknown", None
    if stats.min_value is not None and stats.min_value < 0:
        return "negative", None
    if stats.integer_fraction > INTEGER_MIN_FRACTION:
        return "raw", _median(stats.row_sums)
    linear_median = _median(stats.row_sums)
    if stats.max_value is not None and stats.max_value > LOG_MAX_VALUE:
        return "linear", linear_median
    expm1_median = _median(stats.expm1_row_sums)
    log_struct, lin_struct = _fraction(stats.log_struct), _fraction(stats.lin_struct)
    if lin_struct is not None and lin_struct >= 0.9 and (log_struct is None or log_struct < 0.5):
        return "linear", linear_median
    if expm1_median is not None and BAND_10K[0] <= expm1_median <= BAND_10K[1]:
        return "log1p_10k", expm1_median
    if expm1_median is not None and BAND_CPM[0] <= expm1_median <= BAND_CPM[1]:
        return "log1p_cpm", expm1_median
    if log_struct is None or log_struct >= 0.9:
        return "log1p_other", expm1_median
    return "unknown", expm1_median


def _detect(candidates: Iterable[tuple[str, Any]], X: Any, *, n_sample: int, seed: int) -> NormalizationStatus:
    raw_source: str | None = None
    for name, matrix in candidates:
        if is_count_matrix(matrix, n_sample=n_sample, seed=seed):
            raw_source = name
            break
    stats = _sample_stats(X, n_sample=n_sample, seed=seed) if X is not None else None
    if stats is None:
        x_state, median = "unknown", None
        stats = _Stats(0, np.empty(0), None, None, np.empty(0), np.empty(0), (0, 0), (0, 0))
    else:
        x_state, median = _classify_x(stats)
    if raw_source is None and x_state == "raw":
        raw_source = "X"
    return NormalizationStatus(
        raw_source=raw_source,
        x_state=x_state,
        integer_fraction=stats.integer_fraction,
        median_row_sum=median,
        n_sampled=int(stats.values.size),
        n_rows_sampled=stats.n_rows,
        max_value=stats.max_value,
        log_count_structure=_fraction(stats.log_struct),
        linear_count_structure=_fraction(stats.lin_struct),
    )


def detect_normalization(adata: AnnData, *, n_sample: int = 10_000, seed: int = 0) -> NormalizationStatus:
    """Find raw counts (layers, ``.raw``, X) and classify the scale of X from a random sample.

    Integer test: > 95 % of a uniform random sample of up to ``n_sample`` non-zero values are within
    1e-6 of an integer and none is negative. Row sums come from ``max(200, n_sample // 5)`` random rows.
    """
    if n_sample < 1:
        raise ValueError(f"n_sample must be >= 1, got {n_sample}")
    return _detect(_raw_candidates(adata), adata.X, n_sample=n_sample, seed=seed)


# --------------------------------------------------------------------------------------------
# normalization


def _get_source(adata: AnnData, raw_source: str) -> Any:
    if raw_source == "X":
        return adata.X
    if raw_source == "raw.X":
        return adata.raw[:, adata.var_names].X
    name = raw_source[len("layers['") : -len("']")]
    return adata.layers[name]


def _as_matrix(X: Any) -> np.ndarray | sp.spmatrix:
    if sp.issparse(X) or isinstance(X, np.ndarray):
        return X
    if hasattr(X, "to_memory"):
        return X.to_memory()
    return np.asarray(X)


def _row_sums(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per-row sums of CSR data (empty rows give 0), as float64."""
    lengths = np.diff(indptr)
    sums = np.zeros(lengths.size, dtype=np.float64)
    nonempty = lengths > 0
    if nonempty.any():
        # consecutive non-empty starts delimit exactly one row's values (the rows between are empty)
        sums[nonempty] = np.add.reduceat(data, indptr[:-1][nonempty])
    return sums


def _log1p_scaled_csr(
    X: sp.spmatrix, target_sum: float, *, expm1_first: bool = False, inplace: bool = False
) -> sp.csr_matrix:
    """log1p(rows scaled to ``target_sum``) as float32 CSR; row-local, so it works per row block.

    float32 throughout (values are log1p of at most ~1e10, far inside float32's precision needs).
    New memory unless ``inplace`` (the caller owns ``X``, e.g. a freshly sliced row block).
    """
    X = X if sp.isspmatrix_csr(X) or isinstance(X, sp.csr_array) else sp.csr_matrix(X)
    if inplace and X.dtype == np.float32:
        out = sp.csr_matrix((X.data, X.indices, X.indptr), shape=X.shape, copy=False)
    else:
        out = sp.csr_matrix(
            (np.array(X.data, dtype=np.float32, copy=True), X.indices.copy(), X.indptr.copy()), shape=X.shape
        )
    out.sum_duplicates()
    data = out.data
    if expm1_first:
        np.expm1(data, out=data)
    sums = _row_sums(data, out.indptr)
    scale = np.zeros(sums.shape, dtype=np.float32)
    np.divide(target_sum, sums, out=scale, where=sums > 0, casting="unsafe")
    data *= np.repeat(scale, np.diff(out.indptr))
    np.log1p(data, out=data)
    out.eliminate_zeros()
    return out


def _log1p_per_10k(X: Any, target_sum: float, *, expm1_first: bool = False) -> np.ndarray | sp.csr_matrix:
    """log1p(X scaled so every non-empty row sums to ``target_sum``), float32, new memory.

    Library size is the sum over the genes of this object: callers subset to the shared panel first.
    """
    X = _as_matrix(X)
    if sp.issparse(X):
        return _log1p_scaled_csr(X, target_sum, expm1_first=expm1_first)
    out = np.array(X, dtype=np.float32, copy=True)
    if expm1_first:
        np.expm1(out, out=out)
    sums = out.sum(axis=1, dtype=np.float64)
    scale = np.zeros(sums.shape, dtype=np.float32)
    np.divide(target_sum, sums, out=scale, where=sums > 0, casting="unsafe")
    out *= scale[:, None]
    return np.log1p(out, out=out)


def _as_float32(X: Any) -> np.ndarray | sp.csr_matrix:
    X = _as_matrix(X)
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32, copy=True)
    return np.array(X, dtype=np.float32, copy=True)


def _copy_matrix(X: Any) -> Any:
    X = _as_matrix(X)
    return X.copy()


def _refusal(status: NormalizationStatus, where: str) -> str:
    rescale = (
        "provide raw counts, or pass unsafe_force=True to rescale expm1(X) to 10k "
        "(exact only if X is log1p of per-cell scaled counts)"
    )
    hint = {
        "log1p_cpm": rescale,
        "log1p_other": rescale,
        "negative": "scaled/z-scored values cannot be un-scaled; provide raw counts (unsafe_force=True uses X as-is)",
        "unknown": "provide raw counts in layers['counts'] (unsafe_force=True uses X as-is)",
    }[status.x_state]
    return f"{status.describe()} and no raw counts were found in {', '.join(RAW_CANDIDATES)}{where}: {hint}"


#: expm1(X) rows whose within-row ratios are integers this often are per-cell scaled counts
SCALED_COUNTS_MIN_STRUCTURE = 0.9


def _choose_method(
    status: NormalizationStatus, target_sum: float, unsafe_force: bool, where: str, rescale_scaled_log: bool = False
) -> str:
    """How to reach log1p-``target_sum`` from what detection saw; refuses (or warns when forced).

    ``rescale_scaled_log``: log1p of *any* per-cell scale is rescaled (exact) when expm1(X) has the
    integer-ratio structure of scaled counts, instead of being refused.
    """
    if status.raw_source is not None:
        return "from_raw_counts"
    if status.x_state == "log1p_10k":
        return "as_is" if target_sum == 1e4 else "rescaled_log1p"
    if status.x_state == "linear":
        return "from_linear"
    if (
        rescale_scaled_log
        and status.x_state in ("log1p_cpm", "log1p_other")
        and (status.log_count_structure or 0.0) >= SCALED_COUNTS_MIN_STRUCTURE
    ):
        return "rescaled_log1p"
    if not unsafe_force:
        raise NormalizationError(_refusal(status, where))
    method = "forced_rescaled_log1p" if status.x_state in ("log1p_cpm", "log1p_other") else "forced_as_is"
    logger.warning(
        "UNSAFE NORMALIZATION FORCED: %s and no raw counts were found%s; proceeding with %s. "
        "Predictions from this object may be systematically wrong.",
        status.describe(),
        where,
        method,
    )
    return method


def _normalize_matrix(X: Any, method: str, target_sum: float, *, inplace: bool = False) -> np.ndarray | sp.csr_matrix:
    """Apply a method chosen by :func:`_choose_method` to a whole matrix or a row block.

    New memory, unless ``inplace`` and ``X`` is a float32 CSR the caller owns.
    """
    expm1_first = method in ("rescaled_log1p", "forced_rescaled_log1p")
    if inplace and sp.issparse(X):
        if method in ("as_is", "forced_as_is"):
            return sp.csr_matrix(X, dtype=np.float32)
        return _log1p_scaled_csr(X, target_sum, expm1_first=expm1_first, inplace=True)
    if method in ("as_is", "forced_as_is"):
        return _as_float32(X)
    return _log1p_per_10k(X, target_sum, expm1_first=expm1_first)


def ensure_normalized(
    adata: AnnData,
    *,
    target_sum: float = 1e4,
    unsafe_force: bool = False,
    seed: int = 0,
    n_sample: int = 10_000,
    keep_counts: bool = True,
) -> AnnData:
    """Return a new AnnData with X = log1p(counts per ``target_sum``), float32, sparse kept sparse.

    Preference: raw counts (copied to ``layers['counts']`` unless ``keep_counts=False``, which saves
    one copy of the matrix when the caller does not need them) > X already log1p-10k > X linear. Anything
    else raises :class:`NormalizationError` unless ``unsafe_force`` (logged at WARNING). What was
    done is recorded in ``uns['normalization']``. The caller's object is never modified.
    """
    if target_sum <= 0:
        raise ValueError(f"target_sum must be > 0, got {target_sum}")
    status = detect_normalization(adata, n_sample=n_sample, seed=seed)
    where = f" (file {adata.filename})" if adata.isbacked else ""
    method = _choose_method(status, target_sum, unsafe_force, where)
    layers: dict[str, Any] = {}
    drop_raw = status.raw_source == "raw.X"
    if status.raw_source is not None:
        counts = _get_source(adata, status.raw_source)
        X = _normalize_matrix(counts, method, target_sum)
        if keep_counts:
            layers[COUNTS_LAYER] = _copy_matrix(counts)
    else:
        X = _normalize_matrix(adata.X, method, target_sum)

    for name in adata.layers.keys():
        if name not in layers and (keep_counts or name != COUNTS_LAYER):
            layers[name] = _copy_matrix(adata.layers[name])
    uns = copy.deepcopy(dict(adata.uns))
    uns["normalization"] = {
        "source_state": status.x_state,
        "raw_source": status.raw_source or "",
        "target_sum": float(target_sum),
        "method": method,
        "integer_fraction": float(status.integer_fraction),
        "median_row_sum": float("nan") if status.median_row_sum is None else float(status.median_row_sum),
        "raw_dropped": bool(drop_raw),
    }
    out = AnnData(
        X=X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        obsm={k: _copy_matrix(v) if not isinstance(v, pd.DataFrame) else v.copy() for k, v in adata.obsm.items()},
        varm={k: _copy_matrix(v) if not isinstance(v, pd.DataFrame) else v.copy() for k, v in adata.varm.items()},
        obsp={k: _copy_matrix(v) for k, v in adata.obsp.items()},
        varp={k: _copy_matrix(v) for k, v in adata.varp.items()},
        layers=layers,
        uns=uns,
    )
    if adata.raw is not None and not drop_raw:
        out.raw = adata.raw.to_adata()
    return out


# --------------------------------------------------------------------------------------------
# row-block normalization (annotation of large queries)


class _ColumnView:
    """Rows of ``matrix`` restricted to columns ``cols``, read on demand.

    Lets detection sample a gene subset of a large query without materialising the subset.
    """

    def __init__(self, matrix: Any, cols: np.ndarray) -> None:
        self.matrix = matrix
        self.cols = cols
        self.shape = (int(matrix.shape[0]), int(cols.size))

    def __getitem__(self, rows: np.ndarray) -> sp.csr_matrix:
        return _read_rows(self.matrix, rows)[:, self.cols]


def _view(matrix: Any, cols: np.ndarray | None) -> Any:
    return matrix if cols is None else _ColumnView(matrix, cols)


def _read_row_range(X: Any, start: int, stop: int) -> sp.csr_matrix:
    if sp.issparse(X) and X.format == "csr":
        # zero-copy view of the rows (callers never write into it)
        p0, p1 = int(X.indptr[start]), int(X.indptr[stop])
        return sp.csr_matrix(
            (X.data[p0:p1], X.indices[p0:p1], X.indptr[start : stop + 1] - p0), shape=(stop - start, X.shape[1]), copy=False
        )
    if sp.issparse(X):
        return sp.csr_matrix(X[start:stop])
    block = X[start:stop]
    if hasattr(block, "compute"):  # dask
        block = block.compute()
    if hasattr(block, "to_memory"):
        block = block.to_memory()
    return block if sp.issparse(block) else sp.csr_matrix(np.asarray(block))


@dataclass
class NormalizationPlan:
    """What :func:`plan_normalization` decided; :meth:`rows` applies it to one block of rows.

    log1p(counts per 10k over the chosen genes) is row-local, so a query can be normalised batch by
    batch inside the scoring loop and never exists as a full normalised copy.
    """

    status: NormalizationStatus
    method: str
    target_sum: float
    matrix: Any = field(repr=False)
    cols: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_obs(self) -> int:
        return int(self.matrix.shape[0])

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """log1p-``target_sum`` of rows ``start:stop`` over the planned genes, as a new float32 CSR."""
        block = _read_row_range(self.matrix, start, stop)
        if self.cols is not None:
            block = block[:, self.cols]
        # the block is ours unless slicing handed back the caller's own arrays
        owned = not (sp.issparse(self.matrix) and np.may_share_memory(block.data, self.matrix.data))
        return sp.csr_matrix(_normalize_matrix(block, self.method, self.target_sum, inplace=owned))

    def normalized(self) -> np.ndarray | sp.csr_matrix:
        """All rows over the planned genes, as new float32 memory (dense input stays dense)."""
        matrix = _as_matrix(self.matrix)
        if self.cols is not None:
            matrix = matrix[:, self.cols]
        return _normalize_matrix(matrix, self.method, self.target_sum)

    def record(self) -> dict[str, Any]:
        """The ``uns['normalization']`` record :func:`ensure_normalized` would write."""
        return {
            "source_state": self.status.x_state,
            "raw_source": self.status.raw_source or "",
            "target_sum": float(self.target_sum),
            "method": self.method,
            "integer_fraction": float(self.status.integer_fraction),
            "median_row_sum": float("nan") if self.status.median_row_sum is None else float(self.status.median_row_sum),
            "raw_dropped": self.status.raw_source == "raw.X",
        }


def plan_normalization(
    adata: AnnData,
    genes: Sequence[str] | None = None,
    *,
    target_sum: float = 1e4,
    unsafe_force: bool = False,
    seed: int = 0,
    n_sample: int = 10_000,
    rescale_scaled_log: bool = False,
) -> NormalizationPlan:
    """Detect the scale of ``adata`` restricted to ``genes`` and return how to normalise its rows.

    Same detection, preferences and refusals as :func:`ensure_normalized` on ``adata[:, genes]``
    (library size over exactly ``genes``), but nothing is copied: the plan reads rows on demand.
    """
    if target_sum <= 0:
        raise ValueError(f"target_sum must be > 0, got {target_sum}")
    if n_sample < 1:
        raise ValueError(f"n_sample must be >= 1, got {n_sample}")
    var = pd.Index(adata.var_names.astype(str))
    names = list(var) if genes is None else [str(g) for g in genes]
    cols: np.ndarray | None = var.get_indexer(names)
    missing = [g for g, i in zip(names, cols) if i < 0]
    if missing:
        raise NormalizationError(f"{len(missing)} requested genes are not in var_names: {missing[:20]}")
    if cols.size == len(var) and np.array_equal(cols, np.arange(len(var))):
        cols = None
    candidates: list[tuple[str, Any, np.ndarray | None]] = []
    for name in ("counts", "raw_counts", "raw"):
        if name in adata.layers:
            candidates.append((f"layers['{name}']", adata.layers[name], cols))
    if adata.raw is not None:
        rcols = pd.Index(adata.raw.var_names.astype(str)).get_indexer(names)
        if (rcols >= 0).all():
            identity = rcols.size == adata.raw.n_vars and np.array_equal(rcols, np.arange(rcols.size))
            candidates.append(("raw.X", adata.raw.X, None if identity else rcols))
        else:
            logger.info("raw.X ignored as a counts source: it lacks some of the requested genes")
    X = adata.X
    if sp.issparse(X) and X.format != "csr":
        X = sp.csr_matrix(X)  # row blocks of CSC/COO are not cheap
    status = _detect(((n, _view(m, c)) for n, m, c in candidates), _view(X, cols), n_sample=n_sample, seed=seed)
    where = f" (file {adata.filename})" if adata.isbacked else ""
    method = _choose_method(status, target_sum, unsafe_force, where, rescale_scaled_log)
    if status.raw_source in (None, "X"):
        matrix, mcols = X, cols
    else:
        _, matrix, mcols = next(c for c in candidates if c[0] == status.raw_source)
        if sp.issparse(matrix) and matrix.format != "csr":
            matrix = sp.csr_matrix(matrix)
    return NormalizationPlan(status=status, method=method, target_sum=float(target_sum), matrix=matrix, cols=mcols)


# --------------------------------------------------------------------------------------------
# one entry point for every consumer that needs log expression (plots, domains, annotation, Novae)


def log_normalized(
    adata: AnnData,
    genes: Sequence[str] | None = None,
    *,
    target_sum: float = 1e4,
    unsafe_force: bool = False,
    seed: int = 0,
    n_sample: int = 10_000,
    rescale_scaled_log: bool = False,
) -> tuple[np.ndarray | sp.csr_matrix, dict[str, Any]]:
    """(log1p(counts per ``target_sum``) as a new float32 matrix, the ``uns['normalization']`` record).

    The matrix only, without building a new AnnData: what the domain engines, domain annotation,
    the Novae engine and the plots need. Detection, preferences (raw counts in layers / ``.raw`` / X,
    then log1p-10k X, then linear X) and refusals are those of :func:`ensure_normalized`; ``genes``
    restricts (and orders) the output *and* the library size to those genes, as in
    :func:`plan_normalization`. Sparse input stays sparse, dense stays dense. ``rescale_scaled_log``:
    see :func:`library_scale` (log1p of per-cell scaled counts at any scale is rescaled exactly).
    """
    plan = plan_normalization(
        adata,
        genes,
        target_sum=target_sum,
        unsafe_force=unsafe_force,
        seed=seed,
        n_sample=n_sample,
        rescale_scaled_log=rescale_scaled_log,
    )
    return plan.normalized(), plan.record()


def log_normalized_columns(
    adata: AnnData,
    columns: Sequence[int] | np.ndarray,
    *,
    target_sum: float = 1e4,
    unsafe_force: bool = False,
    seed: int = 0,
    block_rows: int = 20_000,
) -> np.ndarray:
    """Dense float64 (n_obs, len(columns)) log1p-``target_sum`` of a few genes, library over all genes.

    For figures of a handful of genes on a large object: rows are normalised block by block, so the
    normalised matrix never exists in full and only the requested columns are densified.
    """
    plan = plan_normalization(adata, target_sum=target_sum, unsafe_force=unsafe_force, seed=seed)
    idx = np.asarray(columns, dtype=np.int64)
    out = np.empty((plan.n_obs, idx.size), dtype=np.float64)
    for start in range(0, plan.n_obs, block_rows):
        stop = min(start + block_rows, plan.n_obs)
        out[start:stop] = plan.rows(start, stop)[:, idx].toarray()
    return out


# --------------------------------------------------------------------------------------------
# the dataset's own scale


@dataclass
class LibraryScale:
    """Library sizes of a dataset in molecule units where they can be known, and how they were found.

    ``source``: ``"raw_counts"`` (row sums of the raw counts); ``"recovered_counts"`` (X holds per-cell
    scaled counts, linear or log1p, e.g. spot data shipped library-size normalised: the smallest non-zero
    value of a row is one molecule, so ``row sum / row minimum`` is its library); ``"row_sums"`` (no
    count structure: the linear row sums, the data's own units).
    """

    sizes: np.ndarray
    source: str
    x_state: str

    @property
    def median(self) -> float:
        """Median over non-empty rows (1.0 for an empty object): the dataset's own target sum."""
        pos = self.sizes[self.sizes > 0]
        return float(np.median(pos)) if pos.size else 1.0

    def record(self) -> dict[str, Any]:
        q = np.quantile(self.sizes[self.sizes > 0], [0.05, 0.5, 0.95]) if (self.sizes > 0).any() else [0.0] * 3
        return {"source": self.source, "x_state": self.x_state, "q05": float(q[0]), "median": float(q[1]), "q95": float(q[2])}


def _row_min_positive(X: np.ndarray | sp.csr_matrix) -> np.ndarray:
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        data = np.where(X.data > 0, X.data, np.inf)
        out = np.full(X.shape[0], np.inf)
        lengths = np.diff(X.indptr)
        nonempty = lengths > 0
        if nonempty.any():
            out[nonempty] = np.minimum.reduceat(data, X.indptr[:-1][nonempty])
        return out
    return np.where(X > 0, X, np.inf).min(axis=1)


def library_scale(adata: AnnData, *, seed: int = 0, n_sample: int = 10_000) -> LibraryScale:
    """Per-cell library sizes on the data's own scale (see :class:`LibraryScale`), from one detection.

    Why: normalising every dataset to 10,000 counts distorts low-count panels (a library of 200 turns one
    molecule into log1p(50)) and re-scales data that was already normalised; the domain engines normalise
    to the median of these sizes instead, so one molecule keeps the weight it has in the data.
    """
    plan = plan_normalization(adata, target_sum=1e4, seed=seed, n_sample=n_sample, rescale_scaled_log=True)
    status = plan.status
    matrix = _as_matrix(plan.matrix)
    if plan.cols is not None:
        matrix = matrix[:, plan.cols]
    if status.raw_source is not None:
        sums = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
        return LibraryScale(sums, "raw_counts", status.x_state)
    logged = plan.method in ("as_is", "rescaled_log1p", "forced_rescaled_log1p")
    if sp.issparse(matrix):
        lin = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
        if logged:
            np.expm1(lin.data, out=lin.data)
    else:
        lin = np.asarray(matrix, dtype=np.float64)
        lin = np.expm1(lin) if logged else lin
    sums = np.asarray(lin.sum(axis=1), dtype=np.float64).ravel()
    structure = status.log_count_structure if logged else status.linear_count_structure
    if structure is not None and structure >= SCALED_COUNTS_MIN_STRUCTURE:
        unit = _row_min_positive(lin)
        sizes = np.where(np.isfinite(unit) & (unit > 0), sums / np.where(np.isfinite(unit), unit, 1.0), 0.0)
        return LibraryScale(sizes, "recovered_counts", status.x_state)
    return LibraryScale(sums, "row_sums", status.x_state)
