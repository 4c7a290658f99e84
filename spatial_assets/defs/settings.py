"""Platform settings shared by assets, checks and sensors (one resource, configured per deployment)."""

from typing import Optional

import dagster as dg

from spatial_assets.platform.manifest import MANIFEST_KEY
from spatial_assets.platform.registry import LANDING_PREFIX
from spatial_assets.segmentation.qc import QCFilters, QCLimits

_QC, _LIMITS = QCFilters(), QCLimits()  # the QC defaults live in the segmentation package, once


class PlatformSettings(dg.ConfigurableResource):
    """Where the manifests and landing data live, and the scientific parameters of a deployment.

    Everything that changes a result is here (or in the manifest), so it is recorded in the
    materialization metadata and can be audited.
    """

    manifest_key: str = MANIFEST_KEY
    landing_prefix: str = LANDING_PREFIX
    panel_genes: list[str] = []  # empty: each sample's own genes define its panel (one model per panel)
    min_cells_per_type: int = 3  # classes down to 3 cells are kept (flagged as rare in the model card)
    max_cells_per_type: int = 5000
    balance_strategy: str = "proportional"
    min_cells_per_source: int = 0
    confidence_threshold: Optional[float] = None  # None: the model's (held-out reference cells reach 90 % precision)
    reg_per_cell: str = "auto"  # L2 penalty per training cell as a number, or "auto" (cross-validated)
    alignment: str = "auto"  # auto (recenter only when a platform shift is measured) | none | recenter
    unassigned_warn_fraction: float = 0.5
    balance_share_tolerance: float = 0.02
    seed: int = 0
    # spatial domains
    domain_engine: str = ""  # empty: the engine with the better measured ARI (domains.engine.DEFAULT_ENGINE)
    n_domains: int = 6
    domain_levels: list[int] = []  # empty: a range around n_domains
    domain_model_dir: str = ""  # local directory with a pretrained Novae checkpoint (novae engine only)
    domain_signatures: str = "mouse_brain"  # bundled signature set name, or a YAML path
    island_min_size: int = 10  # connected patches of fewer cells are flagged obs['is_island']
    exclude_islands: bool = False  # True: islands get no domain (NaN) instead of the model's call
    # raw samples (instrument folders): segmentation
    segmentation_method: str = ""  # empty: 'vendor' where the folder has the instrument's cells, else 'watershed'
    segmentation_expand_um: Optional[float] = None  # max expansion beyond the nucleus, µm (None: the method's default)
    segmentation_z: str = "all"  # image z plane segmented, or 'all' (maximum projection)
    segmentation_weights_dir: str = ""  # local weights for stardist / cellpose (never downloaded)
    # raw samples: cell QC filters applied before annotation, and the limits the QC check warns above
    qc_min_counts: int = _QC.min_counts
    qc_min_genes: int = _QC.min_genes
    qc_max_control_fraction: float = _QC.max_control_fraction
    qc_min_area_um2: Optional[float] = _QC.min_area_um2
    qc_max_area_um2: Optional[float] = _QC.max_area_um2
    qc_max_mt_fraction: Optional[float] = _QC.max_mt_fraction
    qc_island_min_size: int = _QC.island_min_size
    qc_exclude_islands: bool = _QC.exclude_islands
    qc_warn_control_fraction: float = _LIMITS.max_control_fraction
    qc_warn_assigned_fraction: float = _LIMITS.min_assigned_fraction


def settings_from_env() -> PlatformSettings:
    """Defaults, with the few knobs an operator sets per deployment read from the environment."""
    import os

    overrides: dict = {}
    if os.environ.get("SPATIAL_ASSETS_CONFIDENCE_THRESHOLD"):
        overrides["confidence_threshold"] = float(os.environ["SPATIAL_ASSETS_CONFIDENCE_THRESHOLD"])
    if os.environ.get("SPATIAL_ASSETS_PANEL_GENES"):
        overrides["panel_genes"] = [g for g in os.environ["SPATIAL_ASSETS_PANEL_GENES"].split(",") if g]
    if os.environ.get("SPATIAL_ASSETS_N_DOMAINS"):
        overrides["n_domains"] = int(os.environ["SPATIAL_ASSETS_N_DOMAINS"])
    if os.environ.get("SPATIAL_ASSETS_DOMAIN_ENGINE"):
        overrides["domain_engine"] = os.environ["SPATIAL_ASSETS_DOMAIN_ENGINE"]
    if os.environ.get("SPATIAL_ASSETS_SEGMENTATION_METHOD"):
        overrides["segmentation_method"] = os.environ["SPATIAL_ASSETS_SEGMENTATION_METHOD"]
    if os.environ.get("SPATIAL_ASSETS_NOVAE_MODEL_DIR"):
        overrides["domain_model_dir"] = os.environ["SPATIAL_ASSETS_NOVAE_MODEL_DIR"]
    return PlatformSettings(**overrides)
