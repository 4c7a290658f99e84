"""``spatial-assets celltype``: train on scRNA-seq references and annotate a spatial sample.

Runs :func:`spatial_assets.celltyping.pipeline.run_celltyping`, the code the platform runs, and
writes the annotated h5ad, the label-mapping CSV beside it and, if asked, QC plots and the model.
Every input is checked to be readable before any work starts; every output is written atomically,
so a failure leaves nothing at the destinations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spatial_assets.cli.common import Outputs, Progress, cells_by_genes, fetch_h5ad, fetch_input, read_h5ad

#: options only; the parser must not import the science modules (they are imported by the handler)
DEFAULT_MAX_CELLS_PER_TYPE = 5000
STRATEGIES = ("proportional", "equal")


def _read_target_proportions(path: str) -> dict[str, float]:
    """JSON object ``{class: proportion}`` or a two-column CSV/TSV (class, proportion)."""
    local = fetch_input(path, "target proportions")
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


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


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


def _write_model(outputs: Outputs, model: object, dest: str) -> None:
    """The model pickle and its card, via a local temporary directory (so s3:// works too)."""
    import shutil
    import tempfile

    from spatial_assets.celltyping.training import save_model

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model.pkl"
        save_model(model, local)  # type: ignore[arg-type]
        outputs.write("model", dest, lambda p: shutil.copyfile(local, p))
        outputs.write("model card", f"{dest}.card.json", lambda p: shutil.copyfile(f"{local}.card.json", p))


def _write_plots(outputs: Outputs, progress: Progress, annotated: object, mapping: object, dest: str, threshold: float) -> None:
    import shutil
    import tempfile

    from spatial_assets.celltyping.plots import PLOT_FILES, write_celltyping_plots

    progress(f"plotting to {dest}")
    with tempfile.TemporaryDirectory() as tmp:
        written = write_celltyping_plots(annotated, tmp, confidence_threshold=threshold, mapping_table=mapping)  # type: ignore[arg-type]
        for name, local in written.items():
            outputs.write(f"plot {name}", _join(dest, Path(local).name), lambda p, src=local: shutil.copyfile(src, p), announce=False)
    skipped = sorted(set(PLOT_FILES) - set(written))
    if skipped:
        progress(f"plots skipped (best effort): {', '.join(skipped)}")


def cmd_celltype(args: argparse.Namespace) -> int:
    progress = Progress()
    outputs = Outputs(progress)
    refs, cols = args.reference or [], args.label_column or []
    if len(refs) != len(cols):
        raise ValueError(f"each --reference needs its own --label-column (got {len(refs)} references, {len(cols)} label columns)")
    for ref in refs:  # fail on an unreadable reference before reading anything large
        progress(f"checking reference {ref}")
        fetch_h5ad(ref, "reference")
    proportions = _read_target_proportions(args.target_proportions) if args.target_proportions else None
    progress(f"reading spatial sample {args.spatial}")
    spatial = read_h5ad(args.spatial, "spatial sample")
    progress(f"read {cells_by_genes(spatial)}")

    from spatial_assets.celltyping.pipeline import run_celltyping
    from spatial_assets.celltyping.references import DEFAULT_PLACEHOLDER_LABELS, ReferenceSpec

    specs = [ReferenceSpec(uri=r, label_column=c) for r, c in zip(refs, cols)]
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
        progress=progress,
    )
    out = result.annotated
    outputs.write("annotated h5ad", args.out, out.write_h5ad)
    mapping_path = mapping_table_path(args.out)
    outputs.write("label mapping", mapping_path, lambda path: result.mapping_table.to_csv(path, index=False))
    if args.model_out:
        _write_model(outputs, result.model, args.model_out)
    if args.plots:
        _write_plots(outputs, progress, out, result.mapping_table, args.plots, args.confidence_threshold)
    progress("done")
    print(_summary(out))
    info = out.uns["celltyping"]
    print(f"{info.get('regime_reason')}; alignment: {info.get('alignment')}; confidence threshold "
          f"{info.get('confidence_threshold'):.3f} ({info.get('threshold_source')})")
    print(outputs.summary())
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
    summary = "train a cell-type model on scRNA-seq references and annotate a spatial sample"
    p = subparsers.add_parser(
        "celltype",
        help=summary,
        description=f"{summary}. Writes the annotated h5ad, its label mapping CSV and, if asked, plots and the "
        "model; every output is written atomically, so a failure leaves nothing behind.",
    )
    p.add_argument("--reference", action="append", required=True, metavar="H5AD",
                   help="reference h5ad (path or s3://); repeatable, each with its own --label-column")
    p.add_argument("--label-column", action="append", required=True, metavar="COLUMN",
                   help="obs column holding the labels of the preceding --reference")
    p.add_argument("--spatial", required=True, metavar="H5AD", help="spatial sample h5ad to annotate (path or s3://)")
    p.add_argument("--out", required=True, metavar="H5AD",
                   help="annotated h5ad to write (path or s3://); the label mapping goes to <out>.label_mapping.csv")
    p.add_argument("--confidence-threshold", type=float, default=None, metavar="X",
                   help="cells below this calibrated confidence are called Unassigned (default: the model's own "
                   "threshold, where held-out reference cells reach 90%% precision)")
    p.add_argument("--reg-per-cell", type=_reg_per_cell, default="auto", metavar="X|auto",
                   help="L2 penalty per training cell, or 'auto' (cross-validated on the reference)")
    p.add_argument("--alignment", choices=("auto", "none", "recenter"), default="auto",
                   help="query alignment; 'auto' recenters only when the platform-shift index detects a shift")
    p.add_argument("--max-cells-per-type", type=int, default=DEFAULT_MAX_CELLS_PER_TYPE, metavar="N",
                   help="cap on training cells per cell type (Cap & Fill balancing)")
    p.add_argument("--target-proportions", default=None, metavar="FILE",
                   help="JSON {class: proportion} or 2-column CSV of training proportions (default: none)")
    p.add_argument("--strategy", default="proportional", choices=STRATEGIES,
                   help="how a cell type's quota is shared among references")
    p.add_argument("--placeholder-label", action="append", default=None, metavar="LABEL",
                   help="extra reference label meaning 'no label' (dropped before training), e.g. Ambiguous; repeatable")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every random step (sampling, hold-out, alignment)")
    p.add_argument("--plots", default=None, metavar="DIR", help="also write QC plots (PNG) to this directory or s3:// prefix")
    p.add_argument("--model-out", default=None, metavar="PKL",
                   help="also write the trained model (celltypist-loadable .pkl) and <PKL>.card.json")
    p.set_defaults(func=cmd_celltype)
    return p
