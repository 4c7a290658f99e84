"""``spatial-assets celltype``: train on scRNA-seq references and annotate a spatial sample.

Each subcommand registers itself through ``add_<name>_parser(subparsers)`` and sets
``func`` (args -> exit code), so new subcommands (``domains``, ``audit``) plug in without touching
the others. Bad input ends with exit code 2 and a one-line ``error: ...`` on stderr, and no output
file is written (outputs go to a temporary file that is renamed / uploaded only on success).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path





def _read_target_proportions(path: str) -> dict[str, float]:
    """JSON object ``{class: proportion}`` or a two-column CSV/TSV (class, proportion)."""
    from spatial_assets.storage.objectstore import fetch_to_cache

    local = fetch_to_cache(path)
    text = Path(local).read_text()
    if text.lstrip().startswith("{"):
        data = json.loads(text)
        return {str(k): float(v) for k, v in data.items()}
    import pandas as pd

    sep = "\t" if "\t" in text.splitlines()[0] else ","
    df = pd.read_csv(local, sep=sep)
    if df.shape[1] < 2:
        raise ValueError(f"target proportions file {path}: needs two columns (class, proportion)")
    return {str(k): float(v) for k, v in zip(df.iloc[:, 0], df.iloc[:, 1])}


def mapping_table_path(out: str) -> str:
    """``x/annotated.h5ad`` → ``x/annotated.label_mapping.csv`` (works for s3:// URIs too)."""
    stem = out[: -len(".h5ad")] if out.endswith(".h5ad") else out
    return f"{stem}.label_mapping.csv"


def _summary(adata: object) -> str:
    from spatial_assets.core import schema

    obs = adata.obs  # type: ignore[attr-defined]
    counts = obs[schema.CELL_TYPE].value_counts()
    lines = [f"{adata.n_obs} cells annotated"]  # type: ignore[attr-defined]
    for label, n in counts.items():
        if n:
            lines.append(f"  {label}: {n}")
    lines.append(f"mean confidence: {float(obs[schema.CONFIDENCE].mean()):.3f}")
    lines.append(f"Unassigned fraction: {float((obs[schema.CELL_TYPE] == schema.UNASSIGNED).mean()):.3f}")
    return "\n".join(lines)


def cmd_celltype(args: argparse.Namespace) -> int:
    import anndata as ad

    from spatial_assets.celltyping.pipeline import run_celltyping
    from spatial_assets.storage.objectstore import fetch_to_cache, write_atomic
    from spatial_assets.celltyping.references import DEFAULT_PLACEHOLDER_LABELS, ReferenceSpec

    refs, cols = args.reference or [], args.label_column or []
    if len(refs) != len(cols):
        raise ValueError(f"each --reference needs its own --label-column (got {len(refs)} references, {len(cols)} label columns)")
    specs = [ReferenceSpec(uri=r, label_column=c) for r, c in zip(refs, cols)]
    proportions = _read_target_proportions(args.target_proportions) if args.target_proportions else None
    spatial_path = fetch_to_cache(args.spatial)
    spatial = ad.read_h5ad(spatial_path)
    placeholders = tuple(DEFAULT_PLACEHOLDER_LABELS) + tuple(args.placeholder_label or ())
    result = run_celltyping(
        specs,
        spatial,
        confidence_threshold=args.confidence_threshold,
        max_cells_per_type=args.max_cells_per_type,
        target_proportions=proportions,
        strategy=args.strategy,
        seed=args.seed,
        placeholder_labels=placeholders,
        reg_per_cell=args.reg_per_cell,
        alignment=args.alignment,
        spatial_name=str(args.spatial),
    )
    out = result.annotated
    if args.model_out:
        from spatial_assets.celltyping.training import save_model

        save_model(result.model, args.model_out)
    write_atomic(args.out, out.write_h5ad)
    write_atomic(mapping_table_path(args.out), lambda path: result.mapping_table.to_csv(path, index=False))
    if args.plots:
        from spatial_assets.celltyping.plots import write_celltyping_plots

        write_celltyping_plots(out, args.plots, confidence_threshold=args.confidence_threshold, mapping_table=result.mapping_table)
    print(_summary(out))
    info = out.uns["celltyping"]
    print(f"{info.get('regime_reason')}; alignment: {info.get('alignment')}; confidence threshold {info.get('confidence_threshold'):.3f} "
          f"({info.get('threshold_source')}); written: {args.out}, {mapping_table_path(args.out)}")
    return 0


def _reg_per_cell(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        reg = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'auto', got {value!r}") from None
    if not reg > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'auto', got {value!r}")
    return reg


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("celltype", help="train on scRNA-seq references and annotate a spatial sample")
    p.add_argument("--reference", action="append", required=True, help="reference h5ad (path or s3://); repeatable")
    p.add_argument("--label-column", action="append", required=True, help="label column of the preceding --reference")
    p.add_argument("--spatial", required=True, help="spatial h5ad (path or s3://)")
    p.add_argument("--out", required=True, help="annotated h5ad to write (path or s3://)")
    p.add_argument(
        "--confidence-threshold", type=float, default=None,
        help="calls below it are Unassigned (default: the model's, where held-out reference cells reach 90%% precision)",
    )
    p.add_argument(
        "--reg-per-cell", type=_reg_per_cell, default="auto",
        help="L2 penalty per training cell, or 'auto' (cross-validated on the reference; default)",
    )
    p.add_argument(
        "--alignment", choices=("auto", "none", "recenter"), default="auto",
        help="query alignment; 'auto' recenters only when the platform-shift index detects a shift (default)",
    )
    p.add_argument("--max-cells-per-type", type=int, default=5000)
    p.add_argument("--target-proportions", default=None, help="JSON {class: proportion} or 2-column CSV")
    p.add_argument("--strategy", default="proportional")
    p.add_argument("--placeholder-label", action="append", default=None, help="extra label meaning 'no label'; repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plots", default=None, help="directory for QC plots (best effort)")
    p.add_argument("--model-out", default=None, help="also write the trained model (.pkl + .card.json)")
    p.set_defaults(func=cmd_celltype)
    return p
