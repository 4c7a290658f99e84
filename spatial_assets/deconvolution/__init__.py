"""Spot-level samples (Visium spots, Visium HD bins) and their reference-based deconvolution.

Plain functions over AnnData, no Dagster: :func:`as_spot_sample` / :func:`is_spot_sample` /
:func:`grid_neighbors` (the spot lattice), :func:`deconvolve` (cell-type proportions per spot with
RCTD, FlashDeconv or NNLS), :func:`check_proportions` (what the asset check asserts) and
:func:`deconvolution_plots`.
"""

from spatial_assets.deconvolution.deconvolve import (
    DEFAULT_METHOD,
    DOMINANT,
    DOMINANT_ID,
    DOMINANT_PROPORTION,
    PROPORTIONS_KEY,
    RESIDUAL,
    STATUS,
    UNS_KEY,
    ProportionsReport,
    check_proportions,
    deconvolve,
    mean_proportions,
)
from spatial_assets.deconvolution.methods import METHODS
from spatial_assets.deconvolution.plots import deconvolution_plots
from spatial_assets.deconvolution.reference import DeconvolutionInputError, prepare_reference
from spatial_assets.deconvolution.spots import (
    SPOT_KINDS,
    SpotSampleError,
    as_spot_sample,
    grid_graph,
    grid_neighbors,
    is_spot_sample,
)

__all__ = [
    "DEFAULT_METHOD",
    "DOMINANT",
    "DOMINANT_ID",
    "DOMINANT_PROPORTION",
    "METHODS",
    "PROPORTIONS_KEY",
    "RESIDUAL",
    "SPOT_KINDS",
    "STATUS",
    "UNS_KEY",
    "DeconvolutionInputError",
    "ProportionsReport",
    "SpotSampleError",
    "as_spot_sample",
    "check_proportions",
    "deconvolution_plots",
    "deconvolve",
    "grid_graph",
    "grid_neighbors",
    "is_spot_sample",
    "mean_proportions",
    "prepare_reference",
]
