"""Transcript-level agreement on hand-made assignments."""

from __future__ import annotations

import numpy as np
import pytest

from spatial_assets.segmentation.metrics import transcript_agreement


def test_identical_up_to_relabelling_is_perfect():
    ref = ["a", "a", "b", "b", None, "c"]
    pred = [7, 7, 3, 3, None, 9]
    a = transcript_agreement(pred, ref)
    assert (a.n_reference, a.n_predicted, a.n_matched) == (3, 3, 3)
    assert a.f1 == 1.0 and a.matched_transcript_fraction == 1.0


def test_jaccard_threshold_and_partial_credit():
    # ref cell A has 4 transcripts; pred P1 holds 3 of them + 1 unassigned-by-ref -> J = 3/5 = 0.6 (match)
    # ref cell B has 4; pred P2 holds 2 of them -> J = 2/4 = 0.5 (match at the threshold)
    # ref cell C has 2; pred splits it 1/1 -> J = 0.5 each for P3 and P4, but only one may match
    ref = ["A", "A", "A", "A", None, "B", "B", "B", "B", "C", "C"]
    pred = ["P1", "P1", "P1", None, "P1", "P2", "P2", None, None, "P3", "P4"]
    a = transcript_agreement(pred, ref)
    assert a.n_reference == 3 and a.n_predicted == 4
    assert a.n_matched == 3
    assert a.f1 == pytest.approx(2 * 3 / 7)
    # ref-assigned transcripts: 10; on the matched cell: A 3 + B 2 + C 1 = 6
    assert a.matched_transcript_fraction == pytest.approx(0.6)
    assert a.reference_assigned_fraction == pytest.approx(10 / 11)


def test_merge_of_two_cells_matches_at_most_one():
    ref = ["A"] * 6 + ["B"] * 4
    pred = ["M"] * 10
    a = transcript_agreement(pred, ref)
    assert a.n_matched == 1  # J(A, M) = 0.6; J(B, M) = 0.4
    assert a.matched_transcript_fraction == pytest.approx(0.6)
    assert a.recall == 0.5 and a.precision == 1.0


def test_stricter_threshold_and_bad_inputs():
    ref = ["A", "A", "A", "A"]
    pred = ["P", "P", "P", None]
    assert transcript_agreement(pred, ref, min_jaccard=0.5).n_matched == 1
    assert transcript_agreement(pred, ref, min_jaccard=0.8).n_matched == 0
    with pytest.raises(ValueError, match="different numbers"):
        transcript_agreement(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="min_jaccard"):
        transcript_agreement(["a"], ["a"], min_jaccard=0)
    nan_ref = np.array([np.nan, "A"], dtype=object)
    assert transcript_agreement(["x", "y"], nan_ref).n_reference == 1
