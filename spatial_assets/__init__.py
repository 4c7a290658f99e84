"""spatial_assets: cell-type and tissue-domain maps for spatial transcriptomics.

The science lives in plain modules of this package (no Dagster import); the Dagster code location
lives in :mod:`spatial_assets.defs` and is assembled by :mod:`spatial_assets.definitions`.
"""

__version__ = "0.1.0"
