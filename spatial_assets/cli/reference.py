"""``spatial-assets reference add``: register a reference atlas in the references manifest.

Writes the manifest entry the ``reference_manifest_sensor`` watches, so nobody edits YAML in a
bucket by hand: the id is validated, a duplicate id is refused (``--replace`` updates it), the
file is read with its label column and its normalization checked *before* the entry is written,
and the new manifest replaces the old one in one write. Storage is the deployment's
(``SPATIAL_ASSETS_DEPLOYMENT``, as for the platform), so the entry lands where the sensor looks.
"""

from __future__ import annotations

import argparse

from spatial_assets.cli.common import HelpFormatter


def cmd_reference_add(args: argparse.Namespace) -> int:
    from spatial_assets.platform.manifest import ReferenceEntry
    from spatial_assets.platform.registry import register_reference
    from spatial_assets.storage.deployment import store_from_env

    store, s3_settings = store_from_env()
    entry = ReferenceEntry(
        id=args.id,
        uri=args.uri,
        label_column=args.label_column,
        organism=args.organism,
        placeholder_labels=list(dict.fromkeys(args.placeholder_label or [])),
    )
    result = register_reference(store, entry, manifest_key=args.manifest_key, replace=args.replace, s3_settings=s3_settings)
    verb = "replaced" if result["replaced"] else "added"
    print(
        f"{verb} reference {result['id']!r} in {result['manifest']}: {result['uri']} "
        f"({result['n_cells']} cells × {result['n_genes']} genes, {result['n_labels']} labels in "
        f"{args.label_column!r}, {result['normalization']}, sha256 {result['sha256'][:12]}…)"
    )
    print("the reference_manifest_sensor adds partition references/" + result["id"] + " on its next tick")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from spatial_assets.platform.manifest import MANIFEST_KEY

    summary = "manage the registered scRNA-seq reference atlases"
    p = subparsers.add_parser("reference", help=summary, description=f"{summary}. Add: validate a reference .h5ad and add it to the references manifest the reference sensor watches.")
    sub = p.add_subparsers(dest="reference_command", required=True, metavar="ACTION", help="what to do (add)")
    add = sub.add_parser(
        "add",
        formatter_class=HelpFormatter,
        help="validate a reference file and add it to the references manifest",
        description='Validate a reference .h5ad (readable, label column, normalization) and add it to the references manifest.',
    )
    add.add_argument("--id", required=True, help="reference id (partition key): letters, digits, '.', '_', '-'")
    add.add_argument("--uri", required=True, help="the reference .h5ad: s3://bucket/key or a local path")
    add.add_argument("--label-column", required=True, help="obs column with the cell-type labels")
    add.add_argument("--placeholder-label", action="append", metavar="LABEL",
                     help="a label meaning 'not a cell type' (e.g. Ambiguous), removed before training; repeatable (default: none besides the built-in placeholders)")
    add.add_argument("--organism", default=None, help="organism recorded in the manifest, e.g. mouse (default: none)")
    add.add_argument("--replace", action="store_true", help="update the entry if the id is already registered")
    add.add_argument("--manifest-key", default=MANIFEST_KEY, help="manifest key in the deployment's storage (default: %(default)s)")
    add.set_defaults(func=cmd_reference_add)
