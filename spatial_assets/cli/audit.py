"""``spatial-assets audit --sample ID``: print a sample's lineage chain and whether it is stale."""

from __future__ import annotations

import argparse
from typing import Any

from spatial_assets.cli.common import Progress

EXIT_STALE = 3


def run_audit(
    sample_id: str, *, store: Any = None, s3_settings: Any = None, check_files: bool = True, landing_prefix: str | None = None
) -> int:
    """Print the chain; exit code 0 when every link is up to date, 3 when something upstream changed.

    Every link is compared: reference files → training set → model → annotations, and the
    sample's own chain, landed file → spatial_cells → annotations / domains → summaries.
    """
    from spatial_assets.core.ids import validate_id
    from spatial_assets.platform.audit import SampleKeys, audit_sample
    from spatial_assets.platform.registry import LANDING_PREFIX, scan_landing
    from spatial_assets.storage.objectstore import fetch_to_cache, sha256_file
    from spatial_assets.storage.stores import asset_key

    validate_id(sample_id, "sample id")
    landing_prefix = landing_prefix or LANDING_PREFIX
    if store is None:
        from spatial_assets.storage.deployment import store_from_env

        store, s3_settings = store_from_env()

    def fingerprint(uri: str) -> str:
        return sha256_file(fetch_to_cache(uri, settings=s3_settings))

    def landing_fingerprint(sid: str) -> str | None:  # listing only: no download
        landed = scan_landing(store, landing_prefix, sample_id=sid)[0]
        return landed[0].fingerprint if landed else None

    report = audit_sample(
        store,
        sample_id,
        annotations_key=asset_key("cell_type_annotations", sample_id, ".h5ad"),
        model_card_key=asset_key("celltype_model", "{panel}", ".pkl.card.json"),  # one model per gene panel
        reference_record_key=asset_key("reference_atlas", "{id}", ".json"),
        fingerprint=fingerprint if check_files else None,
        sample_keys=SampleKeys(
            spatial_cells=asset_key("spatial_cells", sample_id, ".h5ad"),
            spatial_domains=asset_key("spatial_domains", sample_id, ".h5ad"),
            domain_model_card=asset_key("domain_model", None, ".zip.card.json"),
            cell_type_summary=asset_key("cell_type_summary", sample_id, ".parquet"),
            domain_composition=asset_key("domain_composition", sample_id, ".parquet"),
            domain_markers=asset_key("domain_markers", sample_id, ".parquet"),
        ),
        landing_fingerprint=landing_fingerprint,
        # a sample segmented from a raw folder: its files and segmentation (ignored for h5ad samples)
        raw_record_key=asset_key("raw_sample", "{id}", ".json"),
        segmented_key=asset_key("segmented_cells", "{id}", ".h5ad"),
    )
    print(report.format())
    return EXIT_STALE if report.stale else 0


def _cmd_audit(args: argparse.Namespace) -> int:
    progress = Progress()
    progress(f"auditing sample {args.sample}" + ("" if args.no_file_check else " (re-hashing reference and raw files)"))
    code = run_audit(args.sample, check_files=not args.no_file_check)
    progress("done: " + ("stale" if code == EXIT_STALE else "up to date") + "; files written: none")
    return code


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    summary = "print a sample's lineage (raw files → cells, references → model → calls, domains, summaries) and what is stale"
    p = subparsers.add_parser(
        "audit",
        help=summary,
        description=f"{summary}. Every link is compared: references → training set → model → annotations, and "
        "landed file → spatial_cells → annotations / domains → summaries. "
        f"Exit code 0: up to date, {EXIT_STALE}: something upstream changed. "
        "Storage from the environment (SPATIAL_ASSETS_DEPLOYMENT, SPATIAL_ASSETS_BUCKET, AWS_*).",
    )
    p.add_argument("--sample", required=True, metavar="ID", help="sample id (the samples partition key)")
    p.add_argument("--no-file-check", action="store_true", help="do not re-hash the reference and raw files at their URIs")
    p.set_defaults(func=_cmd_audit)
    return p
