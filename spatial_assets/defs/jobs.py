"""Named asset jobs, one per area and partition space, so every run says what it was for.

The sensors launch ``references_job``, ``samples_job`` (a landed h5ad) and ``raw_samples_job`` (a
landed instrument folder); the demo launches all of them in order;
the UI lists them under Jobs, where any run can be re-executed. (The automation sensor's runs
target the same assets through Dagster's implicit asset job; they are tagged
``spatial_assets/trigger=automation``.) A job covers one partitions definition, so cell typing
has two: the per-panel models and the per-sample annotations. Each job's partitions are those of
its assets (inferred by Dagster).
"""

import dagster as dg

references_job = dg.define_asset_job(
    "references_job",
    selection=dg.AssetSelection.assets("reference_atlas"),
    description="Validate and fingerprint one registered reference atlas (partition = reference id).",
    tags={"spatial_assets/area": "references"},
)
samples_job = dg.define_asset_job(
    "samples_job",
    selection=dg.AssetSelection.assets("spatial_cells", "sample_panel"),
    description="Read one landed sample, check it, record its gene panel (partition = sample id).",
    tags={"spatial_assets/area": "samples"},
)
raw_samples_job = dg.define_asset_job(
    "raw_samples_job",
    selection=dg.AssetSelection.assets("raw_sample", "segmented_cells", "cell_boundaries", "transcript_assignments", "cell_qc"),
    description=(
        "Read and fingerprint one landed instrument folder, segment it into cells (outlines and transcript "
        "assignments beside them) and QC the cells (partition = sample id); spatial_cells follows by automation."
    ),
    tags={"spatial_assets/area": "segmentation"},
)
panel_models_job = dg.define_asset_job(
    "panel_models_job",
    selection=dg.AssetSelection.assets("gene_panel", "training_set", "label_mapping", "celltype_model"),
    description="Training set, label mapping and CellTypist model of one gene panel (partition = panel id).",
    tags={"spatial_assets/area": "celltyping"},
)
celltyping_job = dg.define_asset_job(
    "celltyping_job",
    selection=dg.AssetSelection.assets("cell_type_annotations", "cell_type_summary"),
    description="Annotate one sample with the model of its own panel, and summarize (partition = sample id).",
    tags={"spatial_assets/area": "celltyping"},
)
domain_model_job = dg.define_asset_job(
    "domain_model_job",
    selection=dg.AssetSelection.assets("domain_model"),
    description="(Re)fit the shared spatial-domain model on every registered sample.",
    tags={"spatial_assets/area": "domains"},
)
domains_job = dg.define_asset_job(
    "domains_job",
    selection=dg.AssetSelection.assets("spatial_domains", "domain_composition", "domain_markers", "spatially_variable_genes"),
    description=(
        "Assign one sample's domains with the shared model, then composition and markers; and the sample's "
        "spatially variable genes (partition = sample id)."
    ),
    tags={"spatial_assets/area": "domains"},
)

spot_samples_job = dg.define_asset_job(
    "spot_samples_job",
    selection=dg.AssetSelection.assets("spot_sample"),
    description="Read one landed spot-level sample (Visium spots / Visium HD bins) and check it (partition = spot sample id).",
    tags={"spatial_assets/area": "deconvolution"},
)
spot_deconvolution_job = dg.define_asset_job(
    "spot_deconvolution_job",
    selection=dg.AssetSelection.assets("spot_deconvolution", "spot_domains", "spot_domain_composition"),
    description="Deconvolve one spot sample with the registered references, then its domains and their composition.",
    tags={"spatial_assets/area": "deconvolution"},
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
