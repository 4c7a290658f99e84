"""Transcripts → cells: one point-in-polygon assignment, from which both the cell-by-gene table and the
per-transcript ``cell_id`` column are built.

Why not ``sopa.aggregate``: it drops every gene matching ``sopa.settings.gene_exclude_pattern``
(blank / negative-control probes, which QC needs to count), it does not return which cell each
transcript went to (the transcripts output needs that), and getting both from sopa would join every
transcript twice. The join here is the same geopandas ``sjoin`` sopa runs (tested to give sopa's
counts when the exclusion pattern is off).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

#: prefixes of control probes across platforms (case-insensitive, '-'/'_' ignored)
CONTROL_PREFIXES = ("blank", "negprb", "negcontrolprobe", "negcontrolcodeword", "unassignedcodeword",
                    "systemcontrol", "negcontrol", "deprecatedcodeword", "intergenic", "antisense")


def is_control(names: Any) -> np.ndarray:
    """True for control / blank / negative-probe feature names (Blank-*, NegPrb*, NegControlProbe_*, …)."""
    low = pd.Index([str(n) for n in names]).str.lower().str.replace("-", "", regex=False).str.replace("_", "", regex=False)
    return np.asarray([s.startswith(CONTROL_PREFIXES) for s in low], dtype=bool)


def assign_transcripts(x: np.ndarray, y: np.ndarray, cells: Any, *, chunk: int = 2_000_000) -> np.ndarray:
    """Row position in ``cells`` (GeoDataFrame, µm) of the polygon holding each point, -1 when none.

    Chunked so the point GeoDataFrame never holds more than ``chunk`` points. A point on two
    overlapping polygons goes to the first one listed.
    """
    import geopandas as gpd

    out = np.full(len(x), -1, dtype=np.int64)
    if len(cells) == 0 or len(x) == 0:
        return out
    poly = gpd.GeoDataFrame(geometry=cells.geometry.to_numpy()).reset_index(drop=True)
    for s in range(0, len(x), chunk):
        e = min(s + chunk, len(x))
        pts = gpd.GeoDataFrame(geometry=gpd.points_from_xy(x[s:e], y[s:e]), index=np.arange(s, e))
        j = gpd.sjoin(pts, poly, how="inner", predicate="within")
        j = j[~j.index.duplicated(keep="first")]
        out[j.index.to_numpy()] = j["index_right"].to_numpy()
    return out


def count_matrix(cell_pos: np.ndarray, gene_codes: np.ndarray, n_cells: int, n_genes: int) -> sp.csr_matrix:
    """Cells × genes raw counts from each transcript's cell row (-1 ignored) and gene code."""
    keep = cell_pos >= 0
    m = sp.coo_matrix(
        (np.ones(int(keep.sum()), np.int32), (cell_pos[keep], gene_codes[keep])), shape=(n_cells, n_genes)
    )
    m.sum_duplicates()
    return m.tocsr()


__all__ = ["CONTROL_PREFIXES", "assign_transcripts", "count_matrix", "is_control"]
