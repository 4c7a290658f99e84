"""``spatial-assets sample land``: put a spatial sample where the platform picks it up.

A cell-level h5ad goes to ``<landing prefix><id>.h5ad``; an instrument output folder (Xenium,
MERSCOPE, CosMx) to ``<landing prefix><id>/``, where the ``sample_landing_sensor`` sees it and
the platform segments it (``raw_sample`` → ``segmented_cells`` → ``cell_qc`` → ``spatial_cells``).
The id is validated and the input is checked as the platform will check it before anything is
written — an h5ad as ``spatial_cells`` does (readable, unique cell ids, finite coordinates, unique
gene names, a non-empty gene panel), a folder with its platform's reader (platform from the file
names, transcripts, image and transform) —; each upload is atomic; an id that has already landed
is refused unless ``--replace``.
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
    if result["kind"] == "raw":
        print(
            f"{verb} raw sample {result['sample_id']!r} at {result['uri']}: {result['platform']} folder, "
            f"{result['n_files']} files ({result['n_bytes'] / 2**20:.1f} MiB), {result['n_transcripts']} transcripts × "
            f"{result['n_genes']} features, image {result['image']}, vendor cells: {'yes' if result['vendor_cells'] else 'no'}"
        )
    else:
        print(
            f"{verb} sample {result['sample_id']!r} at {result['uri']}: {result['n_cells']} cells × "
            f"{result['n_genes']} genes, panel {result['panel_id']} ({result['panel_name']})"
        )
    print("the sample_landing_sensor adds partition samples/" + result["sample_id"] + " on its next tick")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from spatial_assets.platform.registry import LANDING_PREFIX

    summary = "manage spatial samples in the landing area"
    p = subparsers.add_parser("sample", help=summary, description=f"{summary}. Land: validate a cell-level .h5ad or an instrument output folder and upload it to the landing area the sample sensor watches.")
    sub = p.add_subparsers(dest="sample_command", required=True, metavar="ACTION", help="what to do (land)")
    land = sub.add_parser(
        "land",
        formatter_class=HelpFormatter,
        help="validate a cell-level .h5ad or an instrument output folder and upload it to the landing area",
        description=(
            "Validate a cell-level spatial .h5ad, or an instrument output folder (Xenium, MERSCOPE, CosMx: "
            "segmented by the platform), and upload it to the landing area the sample sensor watches."
        ),
    )
    land.add_argument("--id", required=True, help="sample id (partition key): letters, digits, '.', '_', '-'")
    land.add_argument(
        "path",
        help="the sample .h5ad (cells × genes, coordinates in obsm['spatial'] or obs x/y), or an instrument output "
        "folder: local path or s3://",
    )
    land.add_argument("--replace", action="store_true", help="overwrite a sample that has already landed under this id")
    land.add_argument("--landing-prefix", default=LANDING_PREFIX, help="landing prefix in the deployment's storage (default: %(default)s)")
    land.set_defaults(func=cmd_sample_land)
