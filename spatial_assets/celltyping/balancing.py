"""Source-aware class balancing ("Cap & Fill") for combined training references.

Why: a combined reference is dominated by its largest classes and, within a class, by its
largest source. Capping each class and splitting the cap across sources (filling a small
source's shortfall from the others) keeps rare types visible to the classifier without letting
one study's batch effects define a type.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from spatial_assets.core import schema
from spatial_assets.core.sharing import share_matrices

STRATEGIES = ("proportional", "equal")
_SINGLE_SOURCE = "all"


class BalancingError(ValueError):
    """Invalid balancing input (unknown strategy or class, missing column, bad proportions)."""


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise BalancingError(f"unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}")


def _waterfill(
    weights: dict[str, int], lo: dict[str, int], hi: dict[str, int], total: int
) -> dict[str, Fraction]:
    """Exact x_s = clip(λ·w_s, lo_s, hi_s) with Σx = total (requires Σlo ≤ total ≤ Σhi).

    The sum is piecewise linear and non-decreasing in λ, so the segment holding `total` is found
    among the breakpoints lo/w and hi/w and solved exactly in rationals (no float drift that
    could push a rounded target to cap+1).
    """
    def at(lam: Fraction) -> dict[str, Fraction]:
        return {s: min(max(lam * weights[s], Fraction(lo[s])), Fraction(hi[s])) for s in weights}

    pts = sorted(
        {Fraction(0)} | {Fraction(b, w) for s, w in weights.items() if w > 0 for b in (lo[s], hi[s])}
    )
    prev = pts[0]
    for bp in pts:
        if sum(at(bp).values()) >= total:
            break
        prev = bp
    else:
        return {s: Fraction(hi[s]) for s in weights}  # total == Σhi
    x_prev = at(prev)
    free = [s for s in weights if weights[s] > 0 and lo[s] <= prev * weights[s] < hi[s]]
    fixed = sum(v for s, v in x_prev.items() if s not in free)
    free_w = sum(weights[s] for s in free)
    lam = (total - fixed) / free_w if free_w else prev
    return at(lam)


def _largest_remainder(
    x: dict[str, Fraction], total: int, order_key: dict[str, tuple]
) -> dict[str, int]:
    """Integers summing exactly to `total`: floors, then +1 to the largest fractional parts."""
    base = {s: math.floor(v) for s, v in x.items()}
    short = total - sum(base.values())
    ranked = sorted(
        (s for s in x if x[s] - base[s] > 0), key=lambda s: (-(x[s] - base[s]), order_key[s])
    )
    for s in ranked[:short]:
        base[s] += 1
    return base


def allocate_source_targets(
    source_sizes: Mapping[str, int],
    target: int,
    *,
    strategy: str = "proportional",
    min_per_source: int = 0,
) -> dict[str, int]:
    """Split one class's target across its sources.

    Shares are proportional to source size (or equal), each raised to
    min(min_per_source, available) and capped at availability; what a capped source cannot
    supply is redistributed to sources with spare cells. Results sum to exactly
    min(target, total available). If the minimums alone exceed the target, the target is
    split the same way but bounded by the minimums (the minimum cannot be honoured).
    """
    _check_strategy(strategy)
    if isinstance(target, bool) or int(target) != target or target < 0:
        raise BalancingError(f"target must be a non-negative integer, got {target!r}")
    if int(min_per_source) != min_per_source or min_per_source < 0:
        raise BalancingError(f"min_per_source must be a non-negative integer, got {min_per_source!r}")
    sizes: dict[str, int] = {}
    for src, n in source_sizes.items():
        if isinstance(n, bool) or int(n) != n or n < 0:
            raise BalancingError(f"source {src!r}: size must be a non-negative integer, got {n!r}")
        sizes[str(src)] = int(n)
    if not sizes:
        return {}
    total = min(int(target), sum(sizes.values()))
    weights = {s: (n if strategy == "proportional" else int(n > 0)) for s, n in sizes.items()}
    lo = {s: min(int(min_per_source), n) for s, n in sizes.items()}
    hi = dict(sizes)
    if sum(lo.values()) > total:  # minimums infeasible: share the target within them
        hi, lo = lo, {s: 0 for s in sizes}
    x = _waterfill(weights, lo, hi, total)
    order = {s: (-sizes[s], s) for s in sizes}
    out = _largest_remainder(x, total, order)
    return {s: out[str(s)] for s in source_sizes}


def resolve_target_proportions(
    spec: Mapping[str, float] | str | os.PathLike | None,
    classes: Sequence[str],
) -> dict[str, float] | None:
    """Validate requested class proportions (dict, JSON file or CSV `cell_type,proportion`)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        raw = dict(spec)
        where = "target proportions"
    else:
        path = Path(spec)
        where = f"target proportions file {str(path)!r}"
        if not path.is_file():
            raise BalancingError(f"{where} does not exist")
        if path.suffix.lower() == ".json":
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise BalancingError(f"{where} is not valid JSON: {e}") from e
            if not isinstance(raw, dict):
                raise BalancingError(f"{where} must hold a JSON object {{cell_type: proportion}}")
        elif path.suffix.lower() in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
            missing = [c for c in ("cell_type", "proportion") if c not in df.columns]
            if missing:
                raise BalancingError(f"{where} lacks column(s) {missing}; has {list(df.columns)}")
            dup = df["cell_type"][df["cell_type"].duplicated()].tolist()
            if dup:
                raise BalancingError(f"{where} lists cell_type {dup[0]!r} more than once")
            raw = dict(zip(df["cell_type"].astype(str), df["proportion"]))
        else:
            raise BalancingError(f"{where}: expected a .json or .csv file")
    known = [str(c) for c in classes]
    known_set = set(known)
    out: dict[str, float] = {}
    for cls, p in raw.items():
        if str(cls) not in known_set:
            raise BalancingError(f"{where}: unknown cell type {cls!r}; available: {sorted(known_set)}")
        try:
            val = float(p)
        except (TypeError, ValueError) as e:
            raise BalancingError(f"{where}: proportion for {cls!r} is not a number: {p!r}") from e
        if not math.isfinite(val) or not 0.0 <= val <= 1.0:
            raise BalancingError(f"{where}: proportion for {cls!r} must be in [0, 1], got {p!r}")
        out[str(cls)] = val
    total = sum(out.values())
    if total > 1.0 + 1e-9:
        raise BalancingError(f"{where}: proportions sum to {total:.6g} > 1")
    return out


def _stable_seed(seed: int, *names: str) -> np.random.SeedSequence:
    # per (class, source) stream: adding or removing a class does not change the others' draws
    return np.random.SeedSequence([int(seed), *(zlib.crc32(n.encode()) for n in names)])


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def cap_and_fill(
    adata: AnnData,
    *,
    label_column: str = schema.CELL_TYPE,
    source_column: str | None = schema.REFERENCE_SOURCE,
    max_cells_per_type: int = 5000,
    strategy: str = "proportional",
    min_per_source: int = 0,
    target_proportions: Mapping[str, float] | str | os.PathLike | None = None,
    output_size: int | None = None,
    seed: int = 0,
) -> AnnData:
    """Return a balanced subset (rows in original order) with `uns['balancing']`.

    The chosen rows are copied; when every row is kept the matrices are shared with the input.

    Per class target = min(available, max_cells_per_type). With `target_proportions`, the final
    size N is `output_size` or the size of the capped set; a listed class gets
    round(p × N) cells (largest-remainder rounding, so listed targets sum to round(Σp × N) ≤ N;
    the cap does not apply to a listed class, availability does), and the remaining
    N − Σ listed cells are shared by the unlisted classes in proportion to their capped sizes,
    each still bounded by its capped size (so the output can fall short of N; the actual size
    is recorded). Each class target is split across sources with `allocate_source_targets` and
    drawn without replacement from a stream seeded by (seed, class, source).
    `source_column=None` treats all cells as one source.
    """
    _check_strategy(strategy)
    cap = max_cells_per_type
    if isinstance(cap, bool) or int(cap) != cap or cap < 1:
        raise BalancingError(f"max_cells_per_type must be a positive integer, got {cap!r}")
    if output_size is not None and (int(output_size) != output_size or output_size < 0):
        raise BalancingError(f"output_size must be a non-negative integer, got {output_size!r}")
    for col in (label_column, source_column):
        if col is None:
            continue
        if col not in adata.obs.columns:
            raise BalancingError(f"obs column {col!r} not found; available: {list(adata.obs.columns)}")
        if adata.obs[col].isna().any():
            n_missing = int(adata.obs[col].isna().sum())
            raise BalancingError(f"obs column {col!r} has {n_missing} missing values")
    # group rows by (class, source) on integer codes (cheap for categoricals); a stable sort
    # keeps positions within a group in row order
    lab_codes, lab_names = pd.factorize(adata.obs[label_column])
    if source_column is None:
        src_codes, src_names = np.zeros(adata.n_obs, dtype=np.int64), [_SINGLE_SOURCE]
    else:
        src_codes, src_names = pd.factorize(adata.obs[source_column])
    key = lab_codes.astype(np.int64) * len(src_names) + src_codes
    order = np.argsort(key, kind="stable")
    uniq, starts = np.unique(key[order], return_index=True)
    by_class: dict[str, dict[str, np.ndarray]] = {}
    for k, pos in zip(uniq, np.split(order, starts[1:])):
        c, src = str(lab_names[k // len(src_names)]), str(src_names[k % len(src_names)])
        if src in by_class.get(c, {}):
            raise BalancingError(
                f"obs columns {label_column!r}/{source_column!r}: values collide as text ({c!r}, {src!r})"
            )
        by_class.setdefault(c, {})[src] = pos
    by_class = {c: dict(sorted(v.items())) for c, v in sorted(by_class.items())}
    classes = sorted(by_class)
    avail = {c: sum(len(p) for p in by_class[c].values()) for c in classes}
    capped = {c: min(n, int(max_cells_per_type)) for c, n in avail.items()}

    props = resolve_target_proportions(target_proportions, classes)
    if props is None:
        final_size = None
        targets = dict(capped)
    else:
        final_size = int(output_size) if output_size is not None else sum(capped.values())
        want = {c: Fraction(p) * final_size for c, p in props.items()}
        n_listed = _round_half_up(float(sum(want.values())))
        listed = _largest_remainder(want, n_listed, {c: (c,) for c in want})
        targets = {c: min(avail[c], k) for c, k in listed.items()}
        rest = [c for c in classes if c not in props]
        remainder = max(0, final_size - sum(targets.values()))
        targets.update(
            allocate_source_targets({c: capped[c] for c in rest}, remainder, strategy="proportional")
        )

    rows = []
    chosen: list[np.ndarray] = []
    for c in classes:
        src_sizes = {s: len(pos) for s, pos in by_class[c].items()}
        alloc = allocate_source_targets(
            src_sizes, targets[c], strategy=strategy, min_per_source=min_per_source
        )
        for s, k in alloc.items():
            idx = by_class[c][s]
            if k:
                rng = np.random.default_rng(_stable_seed(seed, c, s))
                chosen.append(rng.choice(idx, size=k, replace=False))
            rows.append((c, s, len(idx), k))
    keep = np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=int)
    out = share_matrices(adata, keep)  # a copy of the chosen rows; shared when every row is kept

    counts = pd.DataFrame(rows, columns=["cell_type", "reference_source", "available", "selected"])
    per_class = counts.groupby("cell_type", sort=True)[["available", "selected"]].sum()
    per_class["target"] = [targets[c] for c in per_class.index]
    per_class["proportion"] = [props.get(c, np.nan) if props else np.nan for c in per_class.index]
    # column dicts, not {class: ...}: class names such as "L2/3" are not valid h5ad keys
    out.uns["balancing"] = {
        "method": "cap_and_fill",
        "label_column": label_column,
        "source_column": source_column if source_column is not None else "",
        "max_cells_per_type": int(max_cells_per_type),
        "strategy": strategy,
        "min_per_source": int(min_per_source),
        "seed": int(seed),
        "output_size_requested": -1 if final_size is None else int(final_size),
        "n_obs_in": int(adata.n_obs),
        "n_obs_out": int(out.n_obs),
        "counts": {k: counts[k].to_numpy() for k in counts.columns},
        "classes": {
            "cell_type": per_class.index.to_numpy(dtype=str),
            **{k: per_class[k].to_numpy() for k in per_class.columns},
        },
    }
    return out
