"""Fixtures of the domain-annotation tests: STARmap and its annotation by layer (computed once)."""

from __future__ import annotations

import warnings

import anndata as ad
import pandas as pd
import pytest

from spatial_assets.domains.annotation import annotate_domains
from spatial_assets_tests.domains.annotation.helpers import STARMAP


@pytest.fixture(scope="package")
def starmap() -> ad.AnnData:
    return ad.read_h5ad(STARMAP)


@pytest.fixture(scope="package")
def annotated(starmap: ad.AnnData) -> tuple[ad.AnnData, pd.DataFrame]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return annotate_domains(starmap, "mouse_brain", domain_key="layer")
