"""Dynamic partitions: one per reference atlas, one per spatial sample.

Partitions are added by the sensors (or the demo / CLI) after id validation, never by free text
from the UI, so every partition key is also a safe storage key.
"""

import dagster as dg

from spatial_assets.core.ids import validate_id

references_partitions = dg.DynamicPartitionsDefinition(name="references")
samples_partitions = dg.DynamicPartitionsDefinition(name="samples")


def add_partitions(instance: dg.DagsterInstance, partitions: dg.DynamicPartitionsDefinition, keys: list[str]) -> list[str]:
    """Validate and register ``keys``; returns the ones that were new."""
    kind = "reference id" if partitions.name == "references" else "sample id"
    for key in keys:
        validate_id(key, kind)
    existing = set(instance.get_dynamic_partitions(partitions.name))
    new = [k for k in dict.fromkeys(keys) if k not in existing]
    if new:
        instance.add_dynamic_partitions(partitions.name, new)
    return new
