"""Fixtures of the domain-annotation tests: STARmap and its annotation by layer (computed once)."""

from __future__ import annotations

import warnings

import anndata as ad
import pandas as pd
import pytest

from spatial_assets.domains.annotation import annotate_domains


@pytest.fixture()
def starmap(load_starmap) -> ad.AnnData:
    """STARmap mPFC, a fresh copy per test."""
    return load_starmap()


@pytest.fixture(scope="package")
def annotated(load_starmap) -> tuple[ad.AnnData, pd.DataFrame]:
    """Domain annotation of STARmap by its layers (computed once; tests only read it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return annotate_domains(load_starmap(), "mouse_brain", domain_key="layer")
