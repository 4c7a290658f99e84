"""Novae collapse diagnostics and the training record (novae/diagnostics.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("novae", reason="the Novae engine is an optional extra: pip install 'spatial_assets[novae]'")
pytest.importorskip("torch", reason="the Novae engine is an optional extra: pip install 'spatial_assets[novae]'")

import math  # noqa: E402

import numpy as np  # noqa: E402

from spatial_assets.domains.novae.engine import (  # noqa: E402
    NovaeCollapseError,
    NovaeDomainModel,
    effective_rank,
)
from spatial_assets_tests.domains.novae.helpers import _engine  # noqa: E402


def test_training_record_threads_and_collapse_flag(trained: NovaeDomainModel) -> None:
    c = trained.metadata()["collapse"]
    assert c["train_steps"] == 2 and c["train_epochs"] == 1
    assert math.isclose(c["ln_num_prototypes"], math.log(32), rel_tol=1e-3)
    # two steps cannot beat a uniform assignment: the run must be reported, not hidden
    assert c["train_loss_over_ln_prototypes"] > 0.95
    assert c["collapsed"] is True and c["collapse_reasons"]
    assert trained.metadata()["threads_in_training"] == 1
    assert trained.metadata()["seconds"]["train_step_median"] > 0


def test_strict_collapse_raises(samples: list) -> None:
    with pytest.raises(NovaeCollapseError, match="collapsed"):
        _engine(strict_collapse=True).fit(samples, levels=[2], n_domains=2, seed=0)


def test_effective_rank_numbers() -> None:
    rng = np.random.default_rng(0)
    line = np.outer(rng.normal(size=500), rng.normal(size=16))
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    iso = rng.normal(size=(5000, 16))
    assert 14.5 < effective_rank(iso) <= 16.0  # ≈ d for isotropic data
