"""Dynamic partitions: one per reference atlas, one per spatial sample, one per gene panel, one per spot sample.

Reference and sample partitions are added by the sensors (or the demo) after id validation, never
by free text from the UI, so every partition key is also a safe storage key. Panel partitions are
added by ``sample_panel`` when it meets a gene list no earlier sample had; a panel key is
``p-<12 hex>``, the hash of the sorted gene list (:mod:`spatial_assets.platform.panels`).
"""

import dagster as dg

from spatial_assets.core.ids import validate_id
from spatial_assets.platform.panels import validate_panel_id

references_partitions = dg.DynamicPartitionsDefinition(name="references")
samples_partitions = dg.DynamicPartitionsDefinition(name="samples")
panels_partitions = dg.DynamicPartitionsDefinition(name="panels")
#: spot-level samples (Visium spots, Visium HD bins): their own kind of sample, deconvolved, not annotated
spot_samples_partitions = dg.DynamicPartitionsDefinition(name="spot_samples")

_KINDS = {"references": "reference id", "samples": "sample id", "panels": "panel id", "spot_samples": "spot sample id"}


def validate_partition_key(partitions: dg.DynamicPartitionsDefinition, key: str) -> str:
    if partitions.name == panels_partitions.name:
        return validate_panel_id(key)
    return validate_id(key, _KINDS.get(str(partitions.name), "partition key"))


def add_partitions(instance: dg.DagsterInstance, partitions: dg.DynamicPartitionsDefinition, keys: list[str]) -> list[str]:
    """Validate and register ``keys``; returns the ones that were new."""
    for key in keys:
        validate_partition_key(partitions, key)
    existing = set(instance.get_dynamic_partitions(partitions.name))
    new = [k for k in dict.fromkeys(keys) if k not in existing]
    if new:
        instance.add_dynamic_partitions(partitions.name, new)
    return new


def by_partition(context: dg.AssetExecutionContext, input_name: str, loaded) -> dict:
    """An input mapped to several upstream partitions as ``{partition_key: value}``.

    IO managers differ for the one-partition case (``UPathIOManager`` returns the bare value when
    exactly one upstream partition maps to the input); this normalizes both shapes.
    """
    keys = list(context.asset_partition_keys_for_input(input_name))
    if isinstance(loaded, dict) and set(loaded) <= set(keys):  # (an empty dict: every partition missing)
        return loaded
    if len(keys) == 1:
        return {keys[0]: loaded}
    raise TypeError(f"input {input_name!r}: expected a value per upstream partition {keys}, got {type(loaded).__name__}")


def one_partition(context: dg.AssetExecutionContext, input_name: str, loaded):
    """An input mapped to exactly one upstream partition, as the bare value.

    The counterpart of :func:`by_partition`: an IO manager may return ``{partition_key: value}``
    for a ``dict``-typed input even when one partition maps to it.
    """
    keys = list(context.asset_partition_keys_for_input(input_name))
    if len(keys) == 1 and isinstance(loaded, dict) and list(loaded) == keys:
        return loaded[keys[0]]
    return loaded
