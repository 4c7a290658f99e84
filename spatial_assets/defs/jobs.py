"""Named asset jobs, one per area and partition space, so every run says what it was for.

The sensors launch ``references_job``, ``samples_job`` (a landed h5ad) and ``raw_samples_job`` (a
landed instrument folder); the demo launches all of them in order;
the UI lists them under Jobs, where any run can be re-executed. (The automation sensor's runs
target the same assets through Dagster's implicit asset job; they are tagged
``spatial_assets/trigger=automation``.) A job covers one partitions definition, so cell typing
has two: the per-panel models and the per-sample annotations. Each job's partitions are those of
its assets (inferred by Dagster).
"""

from typing import Any

import dagster as dg


def _job(name: str, area: str, assets: list[str], description: str) -> Any:  # dagster does not export the type (UnresolvedAssetJobDefinition)
    """An asset job over ``assets``, tagged with its area (the UI filters runs by it)."""
    return dg.define_asset_job(
        name, selection=dg.AssetSelection.assets(*assets), description=description, tags={"spatial_assets/area": area}
    )


references_job = _job(
    "references_job",
    "references",
    ["reference_atlas"],
    "Validate and fingerprint one registered reference atlas (partition = reference id).",
)
samples_job = _job(
    "samples_job",
    "samples",
    ["spatial_cells", "sample_panel"],
    "Read one landed sample, check it, record its gene panel (partition = sample id).",
)
raw_samples_job = _job(
    "raw_samples_job",
    "segmentation",
    ["raw_sample", "segmented_cells", "cell_boundaries", "transcript_assignments", "cell_qc"],
    (
        "Read and fingerprint one landed instrument folder, segment it into cells (outlines and transcript "
        "assignments beside them) and QC the cells (partition = sample id); spatial_cells follows by automation."
    ),
)
panel_models_job = _job(
    "panel_models_job",
    "celltyping",
    ["gene_panel", "training_set", "label_mapping", "celltype_model"],
    "Training set, label mapping and CellTypist model of one gene panel (partition = panel id).",
)
celltyping_job = _job(
    "celltyping_job",
    "celltyping",
    ["cell_type_annotations", "cell_type_summary"],
    "Annotate one sample with the model of its own panel, and summarize (partition = sample id).",
)
domain_model_job = _job(
    "domain_model_job",
    "domains",
    ["domain_model"],
    "(Re)fit the shared spatial-domain model on every registered sample.",
)
domains_job = _job(
    "domains_job",
    "domains",
    ["spatial_domains", "domain_composition", "domain_markers", "spatially_variable_genes"],
    (
        "Assign one sample's domains with the shared model, then composition and markers; and the sample's "
        "spatially variable genes (partition = sample id)."
    ),
)

spot_samples_job = _job(
    "spot_samples_job",
    "deconvolution",
    ["spot_sample"],
    "Read one landed spot-level sample (Visium spots / Visium HD bins) and check it (partition = spot sample id).",
)
spot_deconvolution_job = _job(
    "spot_deconvolution_job",
    "deconvolution",
    ["spot_deconvolution", "spot_domains", "spot_domain_composition"],
    "Deconvolve one spot sample with the registered references, then its domains and their composition.",
)

ALL_JOBS = [
    references_job,
    samples_job,
    raw_samples_job,
    panel_models_job,
    celltyping_job,
    domain_model_job,
    domains_job,
    spot_samples_job,
    spot_deconvolution_job,
]
