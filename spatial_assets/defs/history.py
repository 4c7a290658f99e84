"""What the instance recorded about earlier materializations (one place for these queries)."""

from typing import Any, Iterable, Optional

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


def latest_storage_ids(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partitions: Optional[Iterable[str]] = None) -> dict[str, int]:
    """partition → storage id of its latest materialization (one query for every partition)."""
    return dict(
        instance.get_latest_storage_id_by_partition(
            asset_key, dg.DagsterEventType.ASSET_MATERIALIZATION, set(partitions) if partitions is not None else None
        )
    )


def latest_metadata_by_partition(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, key: str, partitions: Optional[Iterable[str]] = None
) -> dict[str, Any]:
    """partition → ``key`` of its latest materialization (two queries, not one per partition)."""
    ids = latest_storage_ids(instance, asset_key, partitions)
    if not ids:
        return {}
    by_id = {storage_id: pk for pk, storage_id in ids.items()}
    out: dict[str, Any] = {}
    storage_ids = sorted(by_id)
    for start in range(0, len(storage_ids), 500):
        chunk = storage_ids[start : start + 500]
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, storage_ids=chunk), limit=len(chunk)
        ).records
        for record in records:
            value = record.asset_materialization.metadata.get(key) if record.asset_materialization else None
            if value is not None:
                out[by_id[record.storage_id]] = value.value
    return out
