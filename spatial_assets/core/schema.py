"""Column and key names shared by every module (CellxGene schema where one exists)."""

# obs columns of a combined training set
ORIGINAL_LABEL = "original_label"
REFERENCE_SOURCE = "reference_source"
CELL_TYPE = "cell_type"
CELL_TYPE_ONTOLOGY_ID = "cell_type_ontology_term_id"
CELL_TYPE_ONTOLOGY_LABEL = "cell_type_ontology_label"

# obs columns written by annotation
PREDICTED = "cell_type_predicted"
CONFIDENCE_RAW = "cell_type_confidence_raw"
CONFIDENCE = "cell_type_confidence"
DECISION_SCORES_OBSM = "cell_type_decision_scores"
LABEL_MAP_UNS = "cell_type_label_map"
CELLTYPING_UNS = "celltyping"
PROVENANCE_UNS = "provenance"

# the call below the confidence threshold, and the ontology marker that goes with it
# (CellxGene schema allows "unknown" as cell_type_ontology_term_id)
UNASSIGNED = "Unassigned"
UNASSIGNED_ONTOLOGY_ID = "unknown"
UNASSIGNED_ONTOLOGY_LABEL = "unknown"

# raw counts live here after normalization
COUNTS_LAYER = "counts"

# spatial
SPATIAL_OBSM = "spatial"
SAMPLE_KEY = "sample_id"
DOMAIN = "domain"
