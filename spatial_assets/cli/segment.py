"""``spatial-assets segment``: an instrument output folder → segmented cells, their outlines and transcripts.

Writes ``OUT.h5ad`` (cells × genes raw counts, ``obsm['spatial']`` in µm, area / transcripts /
nucleus area in ``obs``, platform / method / parameters / versions in ``uns['segmentation']``),
``OUT.boundaries.parquet`` (GeoParquet) and ``OUT.transcripts.parquet`` (one row per input
transcript: ``transcript_index``, ``cell_id`` or null, coordinates, gene). Each file appears only
once complete; bad input writes nothing (a :class:`~spatial_assets.segmentation.errors.SegmentationInputError`
is a ``ValueError``: exit 2 with one line naming the file). Progress lines, the files-written
summary and exit codes are the shared ones of :mod:`spatial_assets.cli.common`.
"""

from __future__ import annotations

import argparse
import tempfile

from spatial_assets.cli.common import InputError, Outputs, Progress

PLATFORM_CHOICES = ("auto", "xenium", "merscope", "cosmx", "visium_hd")
METHOD_CHOICES = ("vendor", "watershed", "comseg", "proseg", "baysor", "stardist", "cellpose")


SUMMARY = "segment an instrument output folder into cells, their outlines and transcripts"
DETAILS = (
    "Writes OUT.h5ad (cells x genes raw counts, obsm['spatial'] in µm, area / transcripts / nucleus area in obs, "
    "platform / method / parameters / versions in uns['segmentation']), OUT.boundaries.parquet (GeoParquet) and "
    "OUT.transcripts.parquet (one row per input transcript: transcript_index, cell_id or null, coordinates, gene). "
    "Each file appears only once complete; bad input writes nothing."
)


def run_segment_command(args: argparse.Namespace) -> int:
    progress = Progress()
    outputs = Outputs(progress)
    if not str(args.out).endswith(".h5ad"):
        raise InputError(f"--out must end with .h5ad, got {args.out!r}")

    from spatial_assets.segmentation.fingerprint import fetch_folder
    from spatial_assets.segmentation.pipeline import segment, write_result
    from spatial_assets.segmentation.readers import read_sample

    with tempfile.TemporaryDirectory(prefix="segment_input_") as tmp:
        folder = fetch_folder(args.input, tmp)
        progress(f"reading {args.input} (platform {args.platform})")
        sample = read_sample(folder, args.platform, z=args.z, fov=args.fov)
        progress(f"{sample.platform}: {len(sample.transcripts):,} transcripts, "
                 f"image {'none' if sample.image is None else sample.image.shape}, vendor cells {'yes' if sample.vendor else 'no'}")
        result = segment(sample, args.method, expand_um=args.expand_um, weights_dir=args.weights_dir, progress=progress)
        progress(f"writing {args.out} and its boundaries / transcripts")
        paths = write_result(result, args.out)  # each file atomic: temp file + rename / multipart upload
    for what, key in (("transcripts parquet", "transcripts"), ("boundaries parquet", "boundaries"), ("cells h5ad", "cells")):
        outputs.add(what, paths[key])
    s = result.summary
    print(f"{args.input} -> {paths['cells']}: {s['n_cells']} cells ({s['platform']}, method {s['method']})")
    print(f"  assigned transcripts: {s['assigned_fraction']:.1%} of {s['n_transcripts']}")
    print(f"  median transcripts per cell: {s['median_transcripts_per_cell']:.0f}")
    print(f"  time: {progress.elapsed:.1f} s (segmentation {s['segmentation_seconds']:.1f} s)")
    progress("done")
    print(outputs.summary())
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``segment`` on the main CLI's subparsers; the handler is ``args.func(args)``."""
    p = subparsers.add_parser("segment", help=SUMMARY, description=f"{SUMMARY}. {DETAILS}")
    p.add_argument("--input", required=True, metavar="DIR", help="raw output folder (local or s3:// prefix)")
    p.add_argument("--platform", default="auto", choices=PLATFORM_CHOICES,
                   help="instrument that wrote the folder ('auto': recognised from its files)")
    p.add_argument("--method", default=None, choices=METHOD_CHOICES,
                   help="segmentation method (default: vendor where the folder has the instrument's segmentation, else watershed)")
    p.add_argument("--expand-um", type=float, default=None, metavar="X",
                   help="maximum expansion of a cell beyond its nucleus, µm (watershed; default 6)")
    p.add_argument("--z", default="all", help="image z plane to segment, or 'all' (maximum projection)")
    p.add_argument("--fov", type=int, default=None, help="CosMx field of view (default: the only one)")
    p.add_argument("--weights-dir", default=None, metavar="DIR",
                   help="local weights directory for stardist / cellpose (nothing is downloaded)")
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="output h5ad (local or s3://)")
    p.set_defaults(func=run_segment_command)
    return p


__all__ = ["add_parser", "run_segment_command"]
