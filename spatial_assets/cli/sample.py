"""``spatial-assets sample land``: put a cell-level spatial sample where the platform picks it up.

Uploads the h5ad to ``<landing prefix><id>.h5ad``, which the ``sample_landing_sensor`` watches.
The id is validated and the file is checked as ``spatial_cells`` will check it (readable h5ad,
unique cell ids, finite coordinates, unique gene names, a non-empty gene panel) before anything is
written; the upload is atomic; an id that has already landed is refused unless ``--replace``.
"""

from __future__ import annotations

import argparse

from spatial_assets.cli.common import HelpFormatter


def cmd_sample_land(args: argparse.Namespace) -> int:
    from spatial_assets.platform.registry import land_sample
    from spatial_assets.storage.deployment import store_from_env

    store, s3_settings = store_from_env()
    result = land_sample(
        store, args.id, args.path, landing_prefix=args.landing_prefix, replace=args.replace, s3_settings=s3_settings
    )
    verb = "replaced" if result["replaced"] else "landed"
    print(
        f"{verb} sample {result['sample_id']!r} at {result['uri']}: {result['n_cells']} cells × "
        f"{result['n_genes']} genes, panel {result['panel_id']} ({result['panel_name']})"
    )
    print("the sample_landing_sensor adds partition samples/" + result["sample_id"] + " on its next tick")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from spatial_assets.platform.registry import LANDING_PREFIX

    summary = "manage spatial samples in the landing area"
    p = subparsers.add_parser("sample", help=summary, description=f"{summary}. Land: validate a cell-level .h5ad and upload it to the landing area the sample sensor watches.")
    sub = p.add_subparsers(dest="sample_command", required=True, metavar="ACTION", help="what to do (land)")
    land = sub.add_parser(
        "land",
        formatter_class=HelpFormatter,
        help="validate a cell-level .h5ad and upload it to the landing area",
        description='Validate a cell-level spatial .h5ad and upload it to the landing area the sample sensor watches.',
    )
    land.add_argument("--id", required=True, help="sample id (partition key): letters, digits, '.', '_', '-'")
    land.add_argument("path", help="the sample .h5ad (cells × genes, coordinates in obsm['spatial'] or obs x/y): local path or s3://")
    land.add_argument("--replace", action="store_true", help="overwrite a sample that has already landed under this id")
    land.add_argument("--landing-prefix", default=LANDING_PREFIX, help="landing prefix in the deployment's storage (default: %(default)s)")
    land.set_defaults(func=cmd_sample_land)
