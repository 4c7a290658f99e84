"""One transcript assignment gives the same counts as sopa.aggregate (with its gene exclusion off)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from spatial_assets.segmentation.aggregation import assign_transcripts, count_matrix, is_control


def test_control_probe_names():
    names = ["Blank-3", "NegPrb12", "NegControlProbe_00034", "NegControlCodeword_0500", "UnassignedCodeword_0001",
             "SystemControl7", "CD3E", "mt-Co1", "Gfap"]
    assert is_control(names).tolist() == [True] * 6 + [False] * 3


def test_counts_equal_sopa_aggregate():
    import geopandas as gpd
    import sopa
    from shapely.geometry import box
    from spatialdata import SpatialData
    from spatialdata.models import PointsModel, ShapesModel

    rng = np.random.default_rng(0)
    cells = gpd.GeoDataFrame(geometry=[box(i * 10, 0, i * 10 + 8, 8) for i in range(5)])
    x, y = rng.uniform(-2, 50, 3000), rng.uniform(-2, 10, 3000)
    genes = rng.choice(["A", "B", "C", "Blank-1"], 3000)
    pos = assign_transcripts(x, y, cells)
    codes = pd.Categorical(genes, categories=["A", "B", "Blank-1", "C"]).codes
    ours = count_matrix(pos, codes, 5, 4).toarray()
    sdata = SpatialData(points={"tx": PointsModel.parse(pd.DataFrame({"x": x, "y": y, "gene": genes}), feature_key="gene")},
                        shapes={"cells": ShapesModel.parse(cells)})
    old = sopa.settings.gene_exclude_pattern
    sopa.settings.gene_exclude_pattern = None
    try:
        sopa.aggregate(sdata, aggregate_channels=False, shapes_key="cells", points_key="tx", gene_column="gene")
    finally:
        sopa.settings.gene_exclude_pattern = old
    table = sdata.tables["table"]
    theirs = pd.DataFrame(table.X.toarray(), columns=table.var_names)[["A", "B", "Blank-1", "C"]].to_numpy()
    assert np.array_equal(ours, theirs)
    assert (pos >= 0).sum() == ours.sum() > 0
