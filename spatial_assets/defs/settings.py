"""Platform settings shared by assets, checks and sensors (one resource, configured per deployment)."""

from typing import Optional

import dagster as dg

from spatial_assets.platform.manifest import MANIFEST_KEY
from spatial_assets.platform.registry import LANDING_PREFIX
from spatial_assets.platform.spots import SPOT_LANDING_PREFIX
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
    # L2 penalty per training cell as a number ("0.001"), or "auto": chosen by stratified cross-validation
    # on the reference (the CLI's --reg-per-cell); recorded in the model card and celltype_model metadata
    reg_per_cell: str = "auto"
    # query alignment (the CLI's --alignment): auto (recenter only when the platform-shift index says
    # there is a shift) | none | recenter; recorded with the shift index in each annotation's metadata
    alignment: str = "auto"
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
    svg_n_top: int = 2000  # spatially_variable_genes: the n highest Moran's I genes are flagged (as the domain engine selects)
    # spot-level samples (Visium spots, Visium HD bins)
    spot_landing_prefix: str = SPOT_LANDING_PREFIX
    spot_bin_size_um: int = 8  # the bin size read from a landed SpaceRanger Visium HD folder (2, 8 or 16)
    deconvolution_method: str = "platform_nb"  # platform_nb | rctd | flashdeconv | nnls (deconvolution.METHODS)
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
    if os.environ.get("SPATIAL_ASSETS_REG_PER_CELL"):
        overrides["reg_per_cell"] = os.environ["SPATIAL_ASSETS_REG_PER_CELL"]
    if os.environ.get("SPATIAL_ASSETS_ALIGNMENT"):
        overrides["alignment"] = os.environ["SPATIAL_ASSETS_ALIGNMENT"]
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
    check_celltyping_settings(overrides.get("reg_per_cell", "auto"), overrides.get("alignment", "auto"), source="environment")
    return PlatformSettings(**overrides)


def check_celltyping_settings(reg_per_cell: str, alignment: str, *, source: str = "settings") -> None:
    """Refuse a bad ``reg_per_cell`` / ``alignment`` when the deployment starts, naming the value,
    rather than at the first training or annotation run."""
    from spatial_assets.celltyping.annotation import ALIGNMENTS

    if alignment not in ALIGNMENTS:
        raise ValueError(f"{source}: alignment must be one of {list(ALIGNMENTS)}, got {alignment!r} (SPATIAL_ASSETS_ALIGNMENT)")
    if reg_per_cell != "auto":
        try:
            ok = float(reg_per_cell) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{source}: reg_per_cell must be 'auto' or a positive number, got {reg_per_cell!r} (SPATIAL_ASSETS_REG_PER_CELL)"
            )
