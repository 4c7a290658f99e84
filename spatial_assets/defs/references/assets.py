"""``reference_atlas``: one partition per reference listed in the references manifest."""

import dagster as dg

from spatial_assets.core.lineage import library_versions
from spatial_assets.defs.metadata import OWNERS, STORAGE_KIND
from spatial_assets.defs.partitions import references_partitions
from spatial_assets.defs.plots import md_table
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.registry import describe_reference, entry_fingerprint, find_entry


@dg.asset(
    partitions_def=references_partitions,
    group_name="references",
    owners=OWNERS,
    code_version="1",
    kinds={"json", STORAGE_KIND},
    description=(
        "A registered scRNA-seq reference atlas: the file at the manifest URI, validated (label "
        "column, normalization state) and fingerprinted (sha256 + ETag). The atlas itself stays at "
        "its URI; this record pins the exact bytes the training sets must read. `reference_sha256` "
        "is the hash annotations cite; `sha256` / `uri` are those of this JSON record."
    ),
)
def reference_atlas(context: dg.AssetExecutionContext, storage: StorageResource, settings: PlatformSettings) -> dict:
    store = storage.get_store()
    entry = find_entry(store, settings.manifest_key, context.partition_key)
    fingerprint = entry_fingerprint(entry, s3_settings=storage.s3_settings(), allowed=storage.allowed())
    record = describe_reference(entry, s3_settings=storage.s3_settings(), allowed=storage.allowed())
    labels = record["label_counts"]
    context.add_output_metadata(
        {
            # the reference file's own identity; `uri`/`sha256` are the IO manager's (the stored record)
            "reference_uri": dg.MetadataValue.path(record["uri"]),
            "reference_sha256": record["sha256"],
            "reference_etag": record["etag"],
            "manifest_uri": dg.MetadataValue.path(store.uri(settings.manifest_key)),
            "fingerprint": fingerprint,
            "n_cells": record["n_obs"],
            "n_genes": record["n_vars"],
            "label_column": record["label_column"],
            "n_labels": len(labels),
            "normalization": record["normalization"]["x_state"],
            "label_counts": md_table(["label", "cells"], labels.items()),
            "library_versions": library_versions(),
        }
    )
    return record
