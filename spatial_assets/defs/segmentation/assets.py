"""Raw instrument folders → segmented cells → QC'd cells: one partition per sample.

A sample that lands as an instrument output folder (``<landing prefix><id>/``, Xenium / MERSCOPE /
CosMx, platform detected by the landing sensor from the file names) is read and fingerprinted
(``raw_sample``), segmented (``segmented_cells``, with ``cell_boundaries`` (GeoParquet) and
``transcript_assignments`` (one row per input transcript and its cell) stored beside it by the IO
manager), and QC'd (``cell_qc``, guarded by the blocking check ``cell_qc_invariants``).
``spatial_cells`` then reads the QC'd cells, so everything downstream is the same as for a
sample landed as a cell-level h5ad. The science is in :mod:`spatial_assets.segmentation` and
:mod:`spatial_assets.platform.raw_samples`; these wrappers record what a user needs to audit it.

Samples landed as h5ad have no partitions of these assets (they stay missing; nothing is wrong).
"""

import tempfile
from pathlib import Path
from typing import Any

import anndata as ad
import dagster as dg
import pandas as pd

from spatial_assets.core.lineage import library_versions
from spatial_assets.defs.automation import on_upstream_change
from spatial_assets.defs.execution import op_tags_for
from spatial_assets.defs.metadata import OWNERS, STORAGE_KIND, table_metadata
from spatial_assets.defs.partitions import one_partition, samples_partitions
from spatial_assets.defs.plots import WithFigures, md_table, render_figures
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.raw_samples import (
    RAW_UNS,
    SEGMENTATION_UNS,
    describe_raw_sample,
    qc_raw_sample,
    read_recorded_sample,
    segment_raw_sample,
    segmentation_settings,
)
from spatial_assets.platform.registry import prefix_uri, scan_landing

GROUP = "segmentation"
#: the metadata key the landing sensor compares with the listing (as spatial_cells' for an h5ad)
LANDING_FINGERPRINT = "landing_fingerprint"


@dg.asset(
    partitions_def=samples_partitions,
    group_name=GROUP,
    owners=OWNERS,
    code_version="1",
    pool="heavy",
    op_tags=op_tags_for("raw_sample"),
    kinds={"json", STORAGE_KIND},
    description=(
        "A landed instrument output folder (Xenium, MERSCOPE, CosMx), read with its platform's reader and "
        "fingerprinted: platform, every file's sha256 / ETag / size, transcripts, genes, image. A folder the "
        "readers refuse fails here, naming the file, and nothing is stored."
    ),
)
def raw_sample(context: dg.AssetExecutionContext, storage: StorageResource, settings: PlatformSettings) -> dict:
    sample_id = context.partition_key
    store = storage.get_store()
    landed = {s.sample_id: s for s in scan_landing(store, settings.landing_prefix, sample_id=sample_id)[0]}
    if sample_id not in landed:
        raise FileNotFoundError(f"sample {sample_id!r}: nothing under {prefix_uri(store, settings.landing_prefix)}")
    with tempfile.TemporaryDirectory(prefix=f"raw_{sample_id}_") as tmp:
        record = describe_raw_sample(
            store, landed[sample_id], z=settings.segmentation_z, workdir=tmp,
            method=settings.segmentation_method or None, weights_dir=settings.segmentation_weights_dir or None,
        )
    files = record["files"]
    context.add_output_metadata(
        {
            "landing_uri": dg.MetadataValue.path(record["landing_uri"]),
            LANDING_FINGERPRINT: record["landing_fingerprint"],
            "platform": record["platform"],
            "n_files": record["n_files"],
            "n_bytes": record["n_bytes"],
            "n_transcripts": record["n_transcripts"],
            "n_genes": record["n_genes"],
            "vendor_cells": record["vendor_cells"] or "none",
            "segmentation_method": record["method"],
            "image": dg.MetadataValue.json(record["image"] or {}),
            "files": md_table(["file", "bytes", "sha256", "ETag"],
                              ((rel, f["size"], f["sha256"][:16] + "…", f["etag"]) for rel, f in sorted(files.items()))),
        }
    )
    return record


@dg.multi_asset(
    outs={
        "segmented_cells": dg.AssetOut(
            kinds={"anndata", STORAGE_KIND},
            owners=OWNERS,
            code_version="1",
            automation_condition=on_upstream_change(),
            description=(
                "The sample's segmented cells: cells × genes raw counts (control probes kept, var['is_control']), "
                "obsm['spatial'] in µm, obs area / nucleus area / transcripts; uns['segmentation'] (platform, "
                "method, parameters, versions) and uns['raw_sample'] (every raw file's sha256)."
            ),
        ),
        "cell_boundaries": dg.AssetOut(
            kinds={"geoparquet", STORAGE_KIND},
            owners=OWNERS,
            code_version="1",
            automation_condition=on_upstream_change(),
            description="The outline of every segmented cell (GeoParquet): cell_id (an obs name of segmented_cells) and its polygon in µm.",
            metadata={"format": "geoparquet"},  # what readers of it load (a GeoDataFrame), without importing geopandas here
        ),
        "transcript_assignments": dg.AssetOut(
            kinds={"parquet", STORAGE_KIND},
            owners=OWNERS,
            code_version="1",
            automation_condition=on_upstream_change(),
            description=(
                "One row per input transcript, in input order: transcript_index (0-based row of the input table), "
                "cell_id (an obs name of segmented_cells, null when unassigned), x, y, z (µm), gene (+ vendor_cell_id)."
            ),
        ),
    },
    ins={"raw_sample": dg.AssetIn()},
    partitions_def=samples_partitions,
    group_name=GROUP,
    pool="heavy",
    op_tags=op_tags_for("segmented_cells"),
)
def segmented_cells(
    context: dg.AssetExecutionContext, raw_sample: dict, storage: StorageResource, settings: PlatformSettings
):
    raw_sample = one_partition(context, "raw_sample", raw_sample)
    store = storage.get_store()
    with tempfile.TemporaryDirectory(prefix=f"segment_{context.partition_key}_") as tmp:
        result = segment_raw_sample(store, raw_sample, settings, workdir=tmp, progress=context.log.info)
    cells, s = result.cells, result.summary
    seg = cells.uns[SEGMENTATION_UNS]
    tx = result.transcripts
    yield dg.Output(
        tx,
        output_name="transcript_assignments",
        metadata={
            "n_transcripts": int(len(tx)),
            "n_assigned": int(tx["cell_id"].notna().sum()),
            "assigned_fraction": float(s["assigned_fraction"]),
            **table_metadata(tx),
        },
    )
    yield dg.Output(
        result.boundaries,
        output_name="cell_boundaries",
        metadata={
            "n_cells": int(len(result.boundaries)),
            "outlines_without_transcripts": int(s.get("outlines_without_transcripts", 0)),  # not cells: not stored
            **table_metadata(pd.DataFrame(result.boundaries)),
        },
    )
    yield dg.Output(
        cells,
        output_name="segmented_cells",
        metadata={
            "platform": s["platform"],
            "method": s["method"],
            "n_cells": int(cells.n_obs),
            "n_genes": int(cells.n_vars),
            "n_transcripts": int(s["n_transcripts"]),
            "assigned_fraction": float(s["assigned_fraction"]),
            "median_transcripts_per_cell": float(s["median_transcripts_per_cell"]),
            "segmentation_seconds": float(s["seconds"]),
            "cells_sha256": seg["cells_sha256"],
            "raw_landing_fingerprint": raw_sample["landing_fingerprint"],
            "parameters": dg.MetadataValue.json(seg.get("parameters", {})),
            "settings": dg.MetadataValue.json(segmentation_settings(settings)),
            "segmentation_versions": dg.MetadataValue.json(seg.get("versions", {})),
            "library_versions": library_versions(),
        },
    )


@dg.asset(
    partitions_def=samples_partitions,
    ins={"segmented_cells": dg.AssetIn(), "cell_boundaries": dg.AssetIn(), "raw_sample": dg.AssetIn()},
    automation_condition=on_upstream_change(),
    group_name=GROUP,
    owners=OWNERS,
    code_version="1",
    pool="heavy",
    op_tags=op_tags_for("cell_qc"),
    kinds={"anndata", STORAGE_KIND},
    description=(
        "QC of the segmented cells: counts and genes per cell, control-probe and mitochondrial fraction, area, "
        "isolated islands; the settings' filters applied (only passing cells kept: what spatial_cells reads). "
        "QC histograms and a segmentation overlay (image crop with the outlines) stored beside it."
    ),
)
def cell_qc(
    context: dg.AssetExecutionContext,
    segmented_cells: ad.AnnData,
    cell_boundaries: Any,
    raw_sample: dict,
    storage: StorageResource,
    settings: PlatformSettings,
) -> WithFigures:
    raw_sample = one_partition(context, "raw_sample", raw_sample)
    qc, report = qc_raw_sample(segmented_cells, settings)
    figures = render_figures(lambda d: _qc_histograms(segmented_cells, report, d), context.log)
    figures.update(render_figures(lambda d: _overlay(storage, raw_sample, cell_boundaries, settings, d), context.log))
    failed = report["failed_by"]
    context.add_output_metadata(
        {
            "n_cells_in": int(report["n_cells_in"]),
            "n_cells_out": int(report["n_cells_out"]),
            "n_cells_failed": int(report["n_cells_in"] - report["n_cells_out"]),
            "failed_by": md_table(["rule", "cells failed"], sorted(failed.items())),
            "median_counts": float(report["median_counts"]),
            "median_genes": float(report["median_genes"]),
            "median_area_um2": float(report["median_area_um2"]) if report.get("median_area_um2") is not None else float("nan"),
            "control_fraction": float(report["control_fraction"]),
            "assigned_fraction": float(report["assigned_fraction"]) if report.get("assigned_fraction") is not None else float("nan"),
            "mt_genes": int(report["mt_genes"]),
            "n_islands": int(report["n_islands"]),
            "filters": dg.MetadataValue.json({k: v for k, v in report["filters"].items() if v is not None}),
            "cells_sha256": str(segmented_cells.uns.get(SEGMENTATION_UNS, {}).get("cells_sha256", "")),
            "raw_landing_fingerprint": str(segmented_cells.uns.get(RAW_UNS, {}).get("landing_fingerprint", "")),
        }
    )
    return WithFigures(qc, figures)


def _qc_histograms(segmented: ad.AnnData, report: dict, out_dir: Path) -> dict:
    from spatial_assets.segmentation.plots import qc_plots

    path = out_dir / "qc_histograms.png"
    qc_plots(segmented, report, path=path)  # every segmented cell, with the filter thresholds drawn
    return {"qc_histograms": path}


def _overlay(storage: StorageResource, record: dict, boundaries: Any, settings: PlatformSettings, out_dir: Path) -> dict:
    from spatial_assets.segmentation.plots import segmentation_overlay

    path = out_dir / "segmentation_overlay.png"
    with tempfile.TemporaryDirectory(prefix="overlay_") as tmp:
        sample = read_recorded_sample(storage.get_store(), record, z=settings.segmentation_z, workdir=tmp)
        segmentation_overlay(sample, boundaries, path=path)
    return {"segmentation_overlay": path}


__all__ = ["cell_qc", "raw_sample", "segmented_cells"]
