"""Platform settings shared by assets, checks and sensors (one resource, configured per deployment)."""

from typing import Optional

import dagster as dg

from spatial_assets.platform.manifest import MANIFEST_KEY
from spatial_assets.platform.registry import LANDING_PREFIX


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
    if os.environ.get("SPATIAL_ASSETS_NOVAE_MODEL_DIR"):
        overrides["domain_model_dir"] = os.environ["SPATIAL_ASSETS_NOVAE_MODEL_DIR"]
    return PlatformSettings(**overrides)
