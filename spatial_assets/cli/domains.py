"""``spatial-assets domains``: fit one domain model on all inputs and write one h5ad per input.

Why one model for all inputs: domain ids are only comparable across samples when the samples share
the model (same embedding, same centroids). Outputs are written to a temp file and then moved/uploaded,
so a failure never leaves a partial file at the destination.

The domain engine (and anndata) is imported by the handler only: building the parser must stay
cheap (importing the engine takes about a second), so the engine names are listed here and a test
keeps them equal to ``spatial_assets.domains.engine.ENGINES``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spatial_assets.cli.common import InputError, Outputs, Progress, read_h5ad

#: ``spatial_assets.domains.engine.ENGINES`` / ``DEFAULT_ENGINE`` (checked by a test)
METHODS: tuple[str, ...] = ("neighborhood", "novae")
DEFAULT_METHOD = "neighborhood"


def _parse_levels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise InputError(f"--levels must be comma-separated integers, got {text!r}") from exc


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".h5ad")] if name.endswith(".h5ad") else Path(name).stem


def output_paths(inputs: list[str], out: str) -> list[str]:
    """One input → ``out`` itself; several → ``<out stem>_<input stem>.h5ad`` next to ``out``."""
    if len(inputs) == 1:
        return [out]
    stems = [_stem(p) for p in inputs]
    if len(set(stems)) != len(stems):
        raise InputError(f"several inputs share a file name ({stems}); outputs would overwrite each other")
    base = out[: -len(".h5ad")] if out.endswith(".h5ad") else out
    return [f"{base}_{s}.h5ad" for s in stems]


def run_domains_command(args: argparse.Namespace) -> int:
    progress = Progress()
    outputs = Outputs(progress)
    inputs: list[str] = list(args.spatial)
    outs = output_paths(inputs, args.out)
    levels = _parse_levels(args.levels)
    if args.save_model and args.save_model.startswith("s3://"):
        raise InputError(f"--save-model must be a local directory, got {args.save_model}")

    from spatial_assets.core.schema import DOMAIN
    from spatial_assets.core.spatial import check_unique_cell_ids
    from spatial_assets.domains.engine import DomainInputError, run_domains

    adatas = []
    for uri in inputs:
        progress(f"reading {uri}")
        a = read_h5ad(uri, "spatial sample")
        check_unique_cell_ids(a, str(uri), error=DomainInputError)  # the check celltype / spatial_cells apply
        a.uns["source_path"] = str(uri)  # error messages name the file
        adatas.append(a)
    n_cells = sum(a.n_obs for a in adatas)
    progress(f"fitting {args.method} domain model (K={args.n_domains}) on {n_cells:,} cells from {len(adatas)} input(s)")
    results, model = run_domains(
        adatas,
        n_domains=args.n_domains,
        levels=levels,
        method=args.method,
        batch_key=args.batch_key,
        seed=args.seed,
    )
    for uri, res, dest in zip(inputs, results, outs):
        res.uns.pop("source_path", None)
        counts = res.obs[DOMAIN].value_counts().sort_index()
        print(f"{uri} -> {dest}: {res.n_obs} cells")
        if args.batch_key:
            print(res.obs.groupby([args.batch_key, DOMAIN], observed=False).size().unstack(fill_value=0).to_string())
        else:
            print("  " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        outputs.write("domains h5ad", dest, res.write_h5ad)
    if args.save_model:
        progress(f"saving domain model to {args.save_model}")
        model.save(args.save_model)
        for f in sorted(Path(args.save_model).iterdir()):
            outputs.add("domain model", str(f))
    progress("done")
    print(outputs.summary())
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``domains`` on the main CLI's subparsers; the handler is ``args.func(args)``."""
    summary = "tissue domains for one or several spatial samples (one shared model, comparable ids)"
    p = subparsers.add_parser(
        "domains",
        help=summary,
        description=f"{summary}. One input writes --out itself; several write <out stem>_<input stem>.h5ad each.",
    )
    p.add_argument("--spatial", action="append", required=True, metavar="H5AD",
                   help="spatial sample h5ad, local or s3://; repeatable (all share one model)")
    p.add_argument("--n-domains", type=int, required=True, metavar="K", help="number of domains written to obs['domain']")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS, help="domain engine (novae needs the [novae] extra)")
    p.add_argument("--batch-key", default=None, metavar="COLUMN",
                   help="obs column splitting an input into separate samples (no spatial edges across them)")
    p.add_argument("--levels", default=None, metavar="K1,K2,...",
                   help="extra levels, e.g. 5,8,12, written to obs['domain_level_K'] (default: only K)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every random step")
    p.add_argument("--save-model", default=None, metavar="DIR", help="also save the fitted model (npz + json) to this local directory")
    p.add_argument("--out", required=True, metavar="H5AD", help="output h5ad, local or s3:// (several inputs: suffixed with each input's name)")
    p.set_defaults(func=run_domains_command)
    return p


__all__ = ["DEFAULT_METHOD", "METHODS", "add_parser", "output_paths", "run_domains_command"]
