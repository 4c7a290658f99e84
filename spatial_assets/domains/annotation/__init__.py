"""Domain-level annotation: which cell types make up each tissue domain, and what marks it.

- :mod:`.signatures` — marker signature files (strict YAML, bundled sets in ``spatial_assets/resources``)
  and per-cell signature scores;
- :mod:`.ranking` — one-vs-rest Mann-Whitney U of the scores per domain, elbow-gap calls,
  :func:`annotate_domains` (scores -> ranking -> calls in one go);
- :mod:`.composition` — cell-type composition per sample x domain and domain marker genes.

No Dagster import: this is science code.
"""

from spatial_assets.domains.annotation.composition import domain_composition, domain_marker_genes
from spatial_assets.domains.annotation.ranking import (
    DOMAIN_ANNOTATION_UNS,
    DOMAIN_CELL_TYPE,
    SIGNATURE_CELL_TYPE,
    annotate_domains,
    assign_domain_cell_types,
    elbow_gap,
    rank_signatures_by_domain,
)
from spatial_assets.domains.annotation.signatures import (
    BUNDLED_SIGNATURES,
    RESOURCES_DIR,
    SIGNATURE_SCORES_OBSM,
    SIGNATURE_SCORING_UNS,
    SPATIAL_CONNECTIVITIES,
    TYPE_SEPARATOR,
    DomainAnnotationError,
    SignatureError,
    SignatureSource,
    bundled_signatures_path,
    load_signatures,
    log_normalized_expression,
    score_signatures,
)

__all__ = [
    "BUNDLED_SIGNATURES",
    "DOMAIN_ANNOTATION_UNS",
    "DOMAIN_CELL_TYPE",
    "RESOURCES_DIR",
    "SIGNATURE_CELL_TYPE",
    "SIGNATURE_SCORES_OBSM",
    "SIGNATURE_SCORING_UNS",
    "SPATIAL_CONNECTIVITIES",
    "TYPE_SEPARATOR",
    "DomainAnnotationError",
    "SignatureError",
    "SignatureSource",
    "annotate_domains",
    "assign_domain_cell_types",
    "bundled_signatures_path",
    "domain_composition",
    "domain_marker_genes",
    "elbow_gap",
    "load_signatures",
    "log_normalized_expression",
    "rank_signatures_by_domain",
    "score_signatures",
]
