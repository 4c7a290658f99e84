"""What the instance recorded about earlier materializations."""

from typing import Any, Optional

import dagster as dg


def latest_metadata_value(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str, key: str) -> Optional[Any]:
    """``key`` of the latest materialization of ``asset_key[partition]``, or None."""
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1
    )
    if not result.records:
        return None
    value = result.records[0].asset_materialization.metadata.get(key)
    return value.value if value is not None else None
