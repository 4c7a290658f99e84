"""Transcript-level agreement between two segmentations of the same transcripts.

Why transcripts and not pixels: what a segmentation is *for* is deciding which transcripts form a
cell's expression profile, and two segmentations drawn on different images, resolutions or z
planes can only be compared fairly on the molecules they both saw. A predicted cell and a reference
cell *match* when the Jaccard index of their transcript sets is at least ``min_jaccard`` (0.5 by
default: above 0.5 a cell can match at most one cell of the other side, so matches are one-to-one).

Cells are counted when they hold at least one transcript (a cell with none is invisible at this
level). F1 = 2·matches / (reference cells + predicted cells).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Agreement:
    """Agreement of a predicted segmentation with a reference one (both over the same transcripts)."""

    n_reference: int  #: reference cells holding >= 1 transcript
    n_predicted: int  #: predicted cells holding >= 1 transcript
    n_matched: int  #: one-to-one pairs with transcript Jaccard >= min_jaccard
    precision: float
    recall: float
    f1: float
    #: of the transcripts the reference assigns to a cell, the fraction the prediction puts on the
    #: predicted cell matched to that reference cell (unmatched reference cells count as misses)
    matched_transcript_fraction: float
    #: fraction of reference-assigned transcripts that the prediction assigns to any cell
    reference_assigned_recovered: float
    #: fraction of all transcripts assigned to a cell by the reference / by the prediction
    reference_assigned_fraction: float
    predicted_assigned_fraction: float
    mean_matched_jaccard: float
    min_jaccard: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _codes(labels: Any, name: str) -> tuple[np.ndarray, int]:
    s = pd.Series(np.asarray(labels, dtype=object) if not isinstance(labels, pd.Series) else labels.to_numpy(dtype=object))
    s = s.where(pd.notna(s), None)
    cat = pd.Categorical(s)
    if len(cat) == 0:
        raise ValueError(f"{name}: no transcripts to compare")
    return np.asarray(cat.codes, dtype=np.int64), len(cat.categories)


def transcript_agreement(predicted: Any, reference: Any, *, min_jaccard: float = 0.5) -> Agreement:
    """Compare two per-transcript cell assignments (``None``/NaN = unassigned), position by position.

    ``predicted[i]`` and ``reference[i]`` are the cells the two segmentations give transcript ``i``;
    labels are compared within each side only, so the two sides may use unrelated ids.
    """
    if not 0.0 < float(min_jaccard) <= 1.0:
        raise ValueError(f"min_jaccard must be in (0, 1], got {min_jaccard}")
    p, n_p_cat = _codes(predicted, "predicted")
    r, n_r_cat = _codes(reference, "reference")
    if p.shape != r.shape:
        raise ValueError(f"predicted and reference assign different numbers of transcripts ({p.size} vs {r.size})")
    n = p.size
    p_size = np.bincount(p[p >= 0], minlength=n_p_cat)
    r_size = np.bincount(r[r >= 0], minlength=n_r_cat)
    both = (p >= 0) & (r >= 0)
    pair_key = r[both] * max(n_p_cat, 1) + p[both]
    keys, inter = np.unique(pair_key, return_counts=True)
    rr, pp = keys // max(n_p_cat, 1), keys % max(n_p_cat, 1)
    jac = inter / (r_size[rr] + p_size[pp] - inter)
    # greedy one-to-one matching by decreasing Jaccard (only ties at exactly 0.5 can compete)
    order = np.lexsort((pp, rr, -jac))
    used_r = np.zeros(n_r_cat, bool)
    used_p = np.zeros(n_p_cat, bool)
    matched_inter = 0
    jac_sum = 0.0
    n_matched = 0
    for k in order:
        if jac[k] < min_jaccard:
            break
        if used_r[rr[k]] or used_p[pp[k]]:
            continue
        used_r[rr[k]] = used_p[pp[k]] = True
        matched_inter += int(inter[k])
        jac_sum += float(jac[k])
        n_matched += 1
    n_ref = int((r_size > 0).sum())
    n_pred = int((p_size > 0).sum())
    ref_assigned = int((r >= 0).sum())
    precision = n_matched / n_pred if n_pred else 0.0
    recall = n_matched / n_ref if n_ref else 0.0
    f1 = 2 * n_matched / (n_ref + n_pred) if (n_ref + n_pred) else 0.0
    return Agreement(
        n_reference=n_ref,
        n_predicted=n_pred,
        n_matched=n_matched,
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        matched_transcript_fraction=float(matched_inter / ref_assigned) if ref_assigned else 0.0,
        reference_assigned_recovered=float(both.sum() / ref_assigned) if ref_assigned else 0.0,
        reference_assigned_fraction=float(ref_assigned / n),
        predicted_assigned_fraction=float((p >= 0).sum() / n),
        mean_matched_jaccard=float(jac_sum / n_matched) if n_matched else 0.0,
        min_jaccard=float(min_jaccard),
    )


__all__ = ["Agreement", "transcript_agreement"]
