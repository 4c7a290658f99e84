"""``spatial-assets deconvolve``: cell-type proportions of every spot of a spot-level sample.

Reads the spots (h5ad, path or s3://) and a registered scRNA-seq reference, runs
:func:`spatial_assets.deconvolution.deconvolve` and writes the result (``obsm['cell_type_proportions']``,
one column per reference label, rows summing to 1) atomically: on any error nothing is written.
Progress goes to stderr; the mean proportions are printed on stdout.
"""

from __future__ import annotations

import argparse
import json

from spatial_assets.cli.common import InputError, Outputs, Progress, fetch_h5ad, read_h5ad

#: ``spatial_assets.deconvolution`` METHODS / DEFAULT_METHOD / UNITS / SPOT_KINDS, listed here so that
#: building the parser imports no science (a test keeps them equal)
METHODS: tuple[str, ...] = ("platform_nb", "rctd", "flashdeconv", "nnls")
DEFAULT_METHOD = "platform_nb"
UNITS: tuple[str, ...] = ("cells", "transcripts")
SPOT_KINDS: tuple[str, ...] = ("visium", "visium_hd_bin")


def _method_params(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--method-params must be a JSON object, got {text!r} ({exc})") from exc
    if not isinstance(value, dict):
        raise InputError(f"--method-params must be a JSON object, got {text!r}")
    return value


def cmd_deconvolve(args: argparse.Namespace) -> int:
    progress = Progress()
    outputs = Outputs(progress)
    params = _method_params(args.method_params)

    from spatial_assets.deconvolution import check_proportions, deconvolve, mean_proportions
    from spatial_assets.deconvolution.spots import as_spot_sample, is_spot_sample

    progress(f"reading spots {args.spatial}")
    spots = read_h5ad(args.spatial, "spot table")
    reference = fetch_h5ad(args.reference, "reference")
    if args.kind and not is_spot_sample(spots):
        spots = as_spot_sample(spots, kind=args.kind, bin_size_um=args.bin_size_um, source=str(args.spatial))
    progress(f"{spots.n_obs:,} spots × {spots.n_vars:,} genes; deconvolving with {args.method} (reference {args.reference})")
    out = deconvolve(
        spots,
        str(reference),
        label_column=args.label_column,
        method=args.method,
        seed=args.seed,
        units=args.units,
        method_params=params,
        name=str(args.spatial),
    )
    report = check_proportions(out)
    if not report.passed:  # a bug, not bad input: never write a table that fails the asset check
        raise RuntimeError(f"proportions failed their check: {report.problems}")
    outputs.write("deconvolved spots", args.out, out.write_h5ad)
    if args.plots:
        from spatial_assets.deconvolution.plots import deconvolution_plots

        try:
            paths = deconvolution_plots(out, args.plots, seed=args.seed)
            for name, path in paths.items():
                outputs.add(f"plot {name}", str(path))
        except Exception as exc:  # plots are evidence, not the result
            progress(f"plots skipped: {type(exc).__name__}: {exc}")
    info = out.uns["deconvolution"]
    print(f"{out.n_obs} spots deconvolved with {info['method']} ({info['n_spots_fitted']} fitted, units: {info['units']})")
    print("mean proportions:")
    for label, value in mean_proportions(out).items():
        print(f"  {label}: {value:.4f}")
    print(f"mean residual: {float(out.obs['deconvolution_residual'].mean()):.4f}")
    print(outputs.summary())
    progress("done")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    summary = "cell-type proportions of every spot / bin from a scRNA-seq reference"
    p = subparsers.add_parser("deconvolve", help=summary, description=summary + ". " + __doc__.split("\n\n", 1)[1].replace("\n", " "))
    p.add_argument("--reference", required=True, help="reference h5ad with raw counts (path or s3://)")
    p.add_argument("--label-column", required=True, help="obs column of the reference holding the cell-type labels")
    p.add_argument("--spatial", required=True, help="spot table h5ad with raw counts (path or s3://)")
    p.add_argument("--out", required=True, help="h5ad to write (path or s3://)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help="deconvolution method")
    p.add_argument("--seed", type=int, default=0, help="seed of every random step")
    p.add_argument("--units", default="cells", choices=list(UNITS), help="fractions of cells or of transcripts")
    p.add_argument("--kind", default=None, choices=list(SPOT_KINDS), help="mark the input as this spot kind (array_row/array_col in obs)")
    p.add_argument("--bin-size-um", type=float, default=None, help="bin size for --kind visium_hd_bin")
    p.add_argument("--method-params", default=None, help="JSON object passed to the method (RCTDConfig fields / FlashDeconv arguments)")
    p.add_argument("--plots", default=None, help="directory for the dominant-type and proportion maps (best effort)")
    p.set_defaults(func=cmd_deconvolve)
    return p
