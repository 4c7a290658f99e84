"""``spatial-assets audit --sample ID``: print a sample's lineage chain and whether it is stale."""

from __future__ import annotations

import argparse
from typing import Any

from spatial_assets.storage.stores import asset_key

MODEL_CARD_KEY = asset_key("celltype_model", "{panel}", ".pkl.card.json")  # one model per gene panel
REFERENCE_RECORD_KEY = asset_key("reference_atlas", "{id}", ".json")


def run_audit(sample_id: str, *, store: Any = None, s3_settings: Any = None, check_files: bool = True) -> int:
    """Print the chain; exit code 0 when up to date, 3 when something upstream changed."""
    from spatial_assets.core.ids import validate_id
    from spatial_assets.platform.audit import audit_sample
    from spatial_assets.storage.objectstore import fetch_to_cache, sha256_file

    validate_id(sample_id, "sample id")
    if store is None:
        from spatial_assets.storage.deployment import store_from_env

        store, s3_settings = store_from_env()

    def fingerprint(uri: str) -> str:
        return sha256_file(fetch_to_cache(uri, settings=s3_settings))

    report = audit_sample(
        store,
        sample_id,
        annotations_key=asset_key("cell_type_annotations", sample_id, ".h5ad"),
        model_card_key=MODEL_CARD_KEY,
        reference_record_key=REFERENCE_RECORD_KEY,
        fingerprint=fingerprint if check_files else None,
    )
    print(report.format())
    return 3 if report.stale else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("audit", help="print a sample's lineage: references → training set → model → annotations")
    p.add_argument("--sample", required=True, help="sample id (partition key)")
    p.add_argument("--no-file-check", action="store_true", help="do not re-hash the reference files at their URIs")
    p.set_defaults(func=lambda args: run_audit(args.sample, check_files=not args.no_file_check))
