"""A test-only code location for the kill case: the real assets and resources, plus two test hooks.

* ``GatedIOManager`` — the real local IO manager, except that storing ``cell_type_annotations``
  first records the step process's pid in ``$SPATIAL_ASSETS_TEST_GATE/<run_id>.step`` and waits for
  ``$SPATIAL_ASSETS_TEST_GATE/release``: the test SIGKILLs the step and its run worker exactly there,
  inside the step, after the science ran and before anything is written. Nothing sleeps in product
  code; with ``release`` present it is the plain IO manager.
* ``request_annotations`` — a sensor that, once ``$SPATIAL_ASSETS_TEST_GATE/launch`` exists, requests
  one run of ``cell_type_annotations`` for the partition named in that file (so the daemon itself
  creates, queues and launches the run, as in production).

Loaded by ``dagster-daemon`` through a workspace file (``python_module``) and imported by the test
for the in-process set-up; deployment ``local`` (files under ``$SPATIAL_ASSETS_HOME/storage``).
"""

import os
import time
import warnings
from pathlib import Path

import dagster as dg

from spatial_assets.definitions import build_definitions
from spatial_assets.defs.deployment import build_resources
from upath import UPath

from spatial_assets.defs.io_managers import AssetIOManager, LocalAssetIOManager
from spatial_assets.defs.settings import settings_from_env

warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)

GATE_ENV = "SPATIAL_ASSETS_TEST_GATE"
GATED_ASSET = dg.AssetKey("cell_type_annotations")


class _GatedAssetIOManager(AssetIOManager):
    def __init__(self, *args, gate_dir: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate_dir = gate_dir

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        gate = Path(self.gate_dir) if self.gate_dir else None
        if gate is not None and context.asset_key == GATED_ASSET and not (gate / "release").exists():
            (gate / f"{context.run_id}.step").write_text(str(os.getpid()))
            while not (gate / "release").exists():
                time.sleep(0.05)
        super().handle_output(context, obj)


class GatedIOManager(LocalAssetIOManager):
    gate_dir: str = ""

    def create_io_manager(self, context) -> AssetIOManager:
        store = self.get_store()
        return _GatedAssetIOManager(UPath(str(store.root)), store, h5ad_compression=self.h5ad_compression, gate_dir=self.gate_dir)


def _resources() -> dict:
    resources = {**build_resources("local"), "settings": settings_from_env()}
    io = resources["io_manager"]
    resources["io_manager"] = GatedIOManager(base_dir=io.base_dir, gate_dir=os.environ.get(GATE_ENV, ""))
    return resources


@dg.sensor(asset_selection=[GATED_ASSET], minimum_interval_seconds=1, default_status=dg.DefaultSensorStatus.RUNNING)
def request_annotations(context: dg.SensorEvaluationContext):
    launch = Path(os.environ.get(GATE_ENV, "/nonexistent")) / "launch"
    if not launch.exists():
        return dg.SkipReason("no launch request yet")
    partition = launch.read_text().strip()
    # the asset alone (its checks would only add step processes to spawn): the kill is about the heavy step
    return dg.RunRequest(run_key=f"kill-test-{partition}", partition_key=partition, asset_selection=[GATED_ASSET], asset_check_keys=[])


def build_kill_definitions() -> dg.Definitions:
    """The real assets/checks/resources; only the trigger sensor (no automation or landing sensors)."""
    resources = _resources()
    base = build_definitions(resources)
    return dg.Definitions(assets=base.assets, asset_checks=base.asset_checks, sensors=[request_annotations], resources=resources)


defs = build_kill_definitions()
