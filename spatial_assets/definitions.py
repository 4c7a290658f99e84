"""The Dagster code location: assets, checks, jobs, sensors, schedules and resources of spatial_assets."""

import warnings

import dagster as dg

# Partitioned asset checks are "preview" in Dagster 1.13; they are what the per-sample checks need.
warnings.filterwarnings("ignore", category=dg.PreviewWarning, message=".*partitions_def on an AssetCheckSpec.*")
# The automation sensor runs in the user code server (for the per-panel condition), a beta parameter.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*use_user_code_server.*")

from spatial_assets.defs.automation import automation_sensor
from spatial_assets.defs.celltyping import assets as celltyping_assets
from spatial_assets.defs.celltyping import checks as celltyping_checks
from spatial_assets.defs.deconvolution import assets as deconvolution_assets
from spatial_assets.defs.deconvolution import checks as deconvolution_checks
from spatial_assets.defs.deconvolution import sensors as deconvolution_sensors
from spatial_assets.defs.deployment import build_resources
from spatial_assets.defs.domains import assets as domain_assets
from spatial_assets.defs.domains import checks as domain_checks
from spatial_assets.defs.execution import executor_from_env
from spatial_assets.defs.jobs import ALL_JOBS
from spatial_assets.defs.references import assets as reference_assets
from spatial_assets.defs.references import sensors as reference_sensors
from spatial_assets.defs.samples import assets as sample_assets
from spatial_assets.defs.samples import checks as sample_checks
from spatial_assets.defs.samples import sensors as sample_sensors
from spatial_assets.defs.segmentation import assets as segmentation_assets
from spatial_assets.defs.segmentation import checks as segmentation_checks
from spatial_assets.defs.settings import settings_from_env

_asset_modules = [reference_assets, segmentation_assets, sample_assets, celltyping_assets, domain_assets, deconvolution_assets]
_check_modules = [segmentation_checks, sample_checks, celltyping_checks, domain_checks, deconvolution_checks]


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    """Definitions with the deployment's resources (``SPATIAL_ASSETS_DEPLOYMENT``) or given ones."""
    if resources is None:
        resources = {**build_resources(), "settings": settings_from_env()}
    return dg.Definitions(
        assets=dg.load_assets_from_modules(_asset_modules),
        asset_checks=dg.load_asset_checks_from_modules(_check_modules),
        jobs=ALL_JOBS,
        sensors=[
            reference_sensors.reference_manifest_sensor,
            sample_sensors.sample_landing_sensor,
            deconvolution_sensors.spot_landing_sensor,
            automation_sensor,
        ],
        schedules=[reference_sensors.nightly_reference_reobservation],
        resources=resources,
        executor=executor_from_env(),
    )


defs = build_definitions()
