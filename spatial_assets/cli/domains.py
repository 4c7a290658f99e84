"""``spatial-assets domains``: fit one domain model on all inputs and write one h5ad per input.

Why one model for all inputs: domain ids are only comparable across samples when the samples share
the model (same embedding, same centroids). Outputs are written to a temp file and then moved/uploaded,
so a failure never leaves a partial file at the destination.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad

from spatial_assets.domains.engine import DEFAULT_ENGINE, ENGINES, DomainInputError, run_domains
from spatial_assets.storage.objectstore import fetch_to_cache, write_atomic
from spatial_assets.core.schema import DOMAIN


def _parse_levels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise DomainInputError(f"--levels must be comma-separated integers, got {text!r}") from exc


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".h5ad")] if name.endswith(".h5ad") else Path(name).stem


def output_paths(inputs: list[str], out: str) -> list[str]:
    """One input → ``out`` itself; several → ``<out stem>_<input stem>.h5ad`` next to ``out``."""
    if len(inputs) == 1:
        return [out]
    stems = [_stem(p) for p in inputs]
    if len(set(stems)) != len(stems):
        raise DomainInputError(f"several inputs share a file name ({stems}); outputs would overwrite each other")
    base = out[: -len(".h5ad")] if out.endswith(".h5ad") else out
    return [f"{base}_{s}.h5ad" for s in stems]


def run_domains_command(args: argparse.Namespace) -> int:
    inputs: list[str] = list(args.spatial)
    outs = output_paths(inputs, args.out)
    adatas = []
    for uri in inputs:
        local = fetch_to_cache(uri)
        a = ad.read_h5ad(local)
        a.uns["source_path"] = str(uri)  # error messages name the file
        adatas.append(a)
    results, model = run_domains(
        adatas,
        n_domains=args.n_domains,
        levels=_parse_levels(args.levels),
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
        write_atomic(dest, res.write_h5ad)
    if args.save_model:
        model.save(args.save_model)
        print(f"model saved to {args.save_model}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``domains`` on the main CLI's subparsers; the handler is ``args.func(args)``."""
    p = subparsers.add_parser(
        "domains",
        help="tissue domains for one or several spatial samples (one shared model)",
        description=__doc__,
    )
    p.add_argument("--spatial", action="append", required=True, metavar="PATH", help="h5ad, local or s3:// (repeatable)")
    p.add_argument("--n-domains", type=int, required=True, help="number of domains written to obs['domain']")
    p.add_argument("--method", default=DEFAULT_ENGINE, choices=sorted(ENGINES), help=f"engine (default {DEFAULT_ENGINE})")
    p.add_argument("--batch-key", default=None, help="obs column splitting an input into separate samples")
    p.add_argument("--levels", default=None, help="extra levels, e.g. 5,8,12 (obs['domain_level_K'])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-model", default=None, metavar="DIR", help="also save the fitted model (npz + json)")
    p.add_argument("--out", required=True, help="output h5ad (several inputs: suffixed with each input's name)")
    p.set_defaults(func=run_domains_command)
    return p


__all__ = ["add_parser", "output_paths", "run_domains_command"]
