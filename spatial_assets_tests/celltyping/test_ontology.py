"""Cell Ontology mapping on the real reference labels bundled in data/."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from cellxgene_ontology_guide.ontology_parser import OntologyParser

from spatial_assets.core import schema
from spatial_assets.celltyping.ontology import (
    OntologyError,
    OntologyMatch,
    apply_ontology,
    cl_version,
    map_label,
    map_labels,
)

@pytest.fixture(scope="module")
def parser() -> OntologyParser:
    # the package's own API, used as an independent check of the ids we return
    return OntologyParser()


# expected term *labels* are written from the ontology's wording; the ids are then checked to
# carry exactly that label in CL itself (so a wrong id cannot pass by being copied from a run)
POA_EXPECTED = {
    "Astrocytes": ("CL:0000127", "astrocyte"),
    "Microglia": ("CL:0000129", "microglial cell"),
    "Macrophage": ("CL:0000235", "macrophage"),
    "Endothelial": ("CL:0000115", "endothelial cell"),
    "Ependymal": ("CL:0000065", "ependymal cell"),
    "Excitatory": ("CL:0000679", "glutamatergic neuron"),
    "Inhibitory": ("CL:0000617", "GABAergic neuron"),
    "Mural": ("CL:0008034", "mural cell"),
    "Fibroblast": ("CL:0000057", "fibroblast"),
    "Newly formed oligodendrocyte": ("CL:4072001", "newly formed oligodendrocyte"),
}
PBMC_EXPECTED = {
    "Naive CD4 T": ("CL:0000895", "naive thymus-derived CD4-positive, alpha-beta T cell"),
    "Memory CD4 T": ("CL:0000897", "CD4-positive, alpha-beta memory T cell"),
    "CD14+ Mono": ("CL:0001054", "CD14-positive monocyte"),
    "B": ("CL:0000236", "B cell"),
    "CD8 T": ("CL:0000625", "CD8-positive, alpha-beta T cell"),
    "FCGR3A+ Mono": ("CL:0002396", "CD14-low, CD16-positive monocyte"),
    "NK": ("CL:0000623", "natural killer cell"),
    "DC": ("CL:0000451", "dendritic cell"),
    "Platelet": ("CL:0000233", "platelet"),
}


def test_expected_ids_are_what_the_ontology_says(parser: OntologyParser) -> None:
    for tid, label in [*POA_EXPECTED.values(), *PBMC_EXPECTED.values()]:
        assert parser.get_term_label(tid) == label
        assert not parser.is_term_deprecated(tid)


@pytest.mark.parametrize("loader,column,expected", [
    ("load_poa_reference", "cell_type", POA_EXPECTED),
    ("load_pbmc", "seurat_annotations", PBMC_EXPECTED),
])
def test_real_reference_labels_map_to_expected_cl_ids(loader: str, column: str, expected: dict, request: pytest.FixtureRequest) -> None:
    labels = request.getfixturevalue(loader)().obs[column].dropna().astype(str).unique()  # PBMC3k has unlabelled cells
    table = map_labels(labels).set_index("label")
    assert set(expected) <= set(table.index)
    for label, (tid, tlabel) in expected.items():
        assert table.loc[label, "ontology_term_id"] == tid, label
        assert table.loc[label, "ontology_label"] == tlabel, label
        assert table.loc[label, "tier"] in {"exact", "synonym", "pattern"}
        assert table.loc[label, "score"] >= 0.9
    if loader == "load_pbmc":  # every Seurat tutorial label is an obvious type
        assert (table["tier"] != "unmapped").all()


def test_placeholders_and_nonsense_are_unmapped() -> None:
    for label in ["Ambiguous", "Unstable", "asdf qwerty", "Cluster 7", "Unknown", "doublets", "xx-17"]:
        m = map_label(label)
        assert m == OntologyMatch(label, None, None, "unmapped", 0.0)


def test_qualified_label_is_not_collapsed_onto_a_broader_term() -> None:
    # CL has no "immature oligodendrocyte"; "oligodendrocyte" would merge it with mature cells
    imm = map_label("Immature oligodendrocyte")
    mat = map_label("Mature oligodendrocyte")
    assert imm.tier == "unmapped"
    assert mat.ontology_term_id != "CL:0000128"
    assert map_label("Endothelial 1").tier == "unmapped"  # numbered sub-clusters stay apart


def test_real_poa_reference_keeps_its_14_classes_apart(load_poa_reference) -> None:
    a = load_poa_reference()
    a.obs[schema.ORIGINAL_LABEL] = a.obs["cell_type"].astype(str)
    a.obs[schema.REFERENCE_SOURCE] = "moffitt2018"
    out, table = apply_ontology(a)
    # the authors' 14 labels are 14 different populations: none may be merged by the mapping
    assert out.obs[schema.CELL_TYPE].nunique() == 14
    assert table["n_cells"].sum() == a.n_obs == 1308
    unmapped = set(table.loc[table["tier"] == "unmapped", "label"])
    assert unmapped == {"Ambiguous", "Unstable", "Immature oligodendrocyte"}
    assert (out.obs.loc[out.obs[schema.ORIGINAL_LABEL] == "Unstable", schema.CELL_TYPE] == "Unstable").all()


@pytest.mark.parametrize("label,tid", [
    ("CD4+ T cells", "CL:0000624"), ("CD8+ T", "CL:0000625"), ("Macrophages", "CL:0000235"),
    ("NK cells", "CL:0000623"), ("B cells", "CL:0000236"), ("Monocytes", "CL:0000576"),
    ("dendritic cells", "CL:0000451"), ("DC", "CL:0000451"), ("pDC", "CL:0000784"),
    ("Tregs", "CL:0000815"), ("Astrocytes", "CL:0000127"), ("Astro", "CL:0000127"),
    ("Oligodendrocytes", "CL:0000128"), ("OPC", "CL:0002453"), ("Fibroblasts", "CL:0000057"),
    ("Pericytes", "CL:0000669"), ("Endo", "CL:0000115"), ("  natural   KILLER cell ", "CL:0000623"),
    ("T cells", "CL:0000084"), ("Smc", "CL:0000192"),
])
def test_abbreviation_and_plural_patterns(label: str, tid: str) -> None:
    m = map_label(label)
    assert m.ontology_term_id == tid
    assert m.tier in {"exact", "synonym", "pattern"}


def test_tier_order_and_scores() -> None:
    assert map_label("macrophage").tier == "exact" and map_label("macrophage").score == 1.0
    assert map_label("histiocyte").tier == "synonym"  # CL synonym of macrophage
    assert map_label("histiocyte").ontology_term_id == "CL:0000235"
    assert map_label("Macrophages").tier == "pattern"
    tok = map_label("gamma delta T cells")
    assert tok.tier == "token" and tok.ontology_term_id == "CL:0000798"
    assert 0 < tok.score < map_label("Macrophages").score
    # raising the threshold turns a weak token match into unmapped
    assert map_label("gamma delta T cells", min_token_score=1.01).tier == "unmapped"


def test_patterns_are_anchored() -> None:
    for label in ["not a macrophage-like doublet", "CD4+ T cell doublets with B", "NK-ish"]:
        assert map_label(label).tier not in {"pattern", "exact", "synonym"}


def test_only_cl_ids_in_all_bundled_labels(parser: OntologyParser, load_poa_reference, load_pbmc, load_merfish, load_starmap) -> None:
    labels: list[str] = []
    for load, cols in [
        (load_poa_reference, ["cell_type"]),
        (load_pbmc, ["seurat_annotations"]),
        (load_merfish, ["Cell_class", "Cell_class_major"]),
        (load_starmap, ["cell_type"]),
    ]:
        obs = load().obs
        for c in cols:
            labels += list(obs[c].dropna().astype(str).unique())
    labels += ["lung", "blood", "kidney epithelium", "female", "Homo sapiens", "liver", "brain"]
    table = map_labels(labels)
    ids = table["ontology_term_id"].dropna()
    assert len(ids) >= 25
    assert ids.str.fullmatch(r"CL:\d{7}").all()
    assert not any(parser.is_term_deprecated(t) for t in ids)
    # a mapped label always carries the ontology's own label for its id
    for tid, tlab in table.dropna(subset=["ontology_term_id"])[["ontology_term_id", "ontology_label"]].itertuples(index=False):
        assert parser.get_term_label(tid) == tlab


def test_map_labels_one_row_per_distinct_label_and_deterministic() -> None:
    labels = ["NK", "Macrophages", "NK", "Ambiguous", "gamma delta T cells", "Macrophages"]
    t1 = map_labels(labels)
    t2 = map_labels(list(reversed(labels)))
    assert list(t1.columns) == ["label", "ontology_term_id", "ontology_label", "tier", "score"]
    assert list(t1["label"]) == ["NK", "Macrophages", "Ambiguous", "gamma delta T cells"]
    pd.testing.assert_frame_equal(
        t1.sort_values("label").reset_index(drop=True), t2.sort_values("label").reset_index(drop=True)
    )


def _two_references() -> ad.AnnData:
    labels = ["Macrophages"] * 5 + ["Ambiguous"] * 3 + ["Unstable"] * 2 + ["macrophage"] * 4 + ["Ambiguous"] * 1
    source = ["ref_a"] * 10 + ["ref_b"] * 5
    rng = np.random.default_rng(0)
    a = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(1.0, size=(15, 6)).astype(np.float32)),
        obs=pd.DataFrame(
            {schema.ORIGINAL_LABEL: labels, schema.REFERENCE_SOURCE: source},
            index=[f"c{i}" for i in range(15)],
        ),
    )
    return a


def test_apply_ontology_merges_synonymous_labels_across_references() -> None:
    adata = _two_references()
    before = adata.obs.copy()
    out, table = apply_ontology(adata)
    # caller untouched
    pd.testing.assert_frame_equal(adata.obs, before)
    assert schema.CELL_TYPE not in adata.obs
    assert sp.issparse(out.X)

    ct = out.obs[schema.CELL_TYPE].astype(str)
    assert (ct.iloc[:5] == "macrophage").all() and (ct.iloc[10:14] == "macrophage").all()
    assert (out.obs[schema.CELL_TYPE_ONTOLOGY_ID].astype(str).iloc[:5] == "CL:0000235").all()
    # unmapped labels stay their own (distinct) classes, with the schema's "unknown" id
    assert set(ct) == {"macrophage", "Ambiguous", "Unstable"}
    unm = out.obs[out.obs["ontology_tier"] == "unmapped"]
    assert (unm[schema.CELL_TYPE_ONTOLOGY_ID] == schema.UNASSIGNED_ONTOLOGY_ID).all()
    assert len(unm) == 6
    assert out.uns["ontology"]["cl_version"] == cl_version()

    # audit table: one row per (source, label, ...) with cell counts
    counts = table.set_index([schema.REFERENCE_SOURCE, "label"])["n_cells"].to_dict()
    assert counts == {
        ("ref_a", "Macrophages"): 5, ("ref_a", "Ambiguous"): 3, ("ref_a", "Unstable"): 2,
        ("ref_b", "macrophage"): 4, ("ref_b", "Ambiguous"): 1,
    }
    assert table["n_cells"].sum() == adata.n_obs
    mac = table[table["cell_type"] == "macrophage"]
    assert set(mac["tier"]) == {"pattern", "exact"}


def test_native_ontology_id_wins_when_valid() -> None:
    adata = _two_references()
    ids = ["CL:0000129"] + ["CL:9999999"] + ["UBERON:0002107"] + [""] * 12  # microglia / junk
    adata.obs[schema.CELL_TYPE_ONTOLOGY_ID] = ids
    out, table = apply_ontology(adata)
    assert out.obs["ontology_tier"].iloc[0] == "native"
    assert out.obs[schema.CELL_TYPE].iloc[0] == "microglial cell"
    # invalid / non-CL ids fall back to the label
    assert out.obs[schema.CELL_TYPE_ONTOLOGY_ID].iloc[1] == "CL:0000235"
    assert out.obs[schema.CELL_TYPE_ONTOLOGY_ID].iloc[2] == "CL:0000235"
    assert (table["tier"] == "native").sum() == 1


def test_overrides_fix_a_mapping() -> None:
    m = map_label("Immature oligodendrocyte", overrides={"immature OLIGODENDROCYTE": "CL:0002453"})
    assert (m.ontology_term_id, m.tier, m.ontology_label) == ("CL:0002453", "manual", "oligodendrocyte precursor cell")
    assert map_label("Macrophages", overrides={"macrophages": None}).tier == "unmapped"
    with pytest.raises(OntologyError, match="UBERON:0002107"):
        map_label("liver cell", overrides={"liver cell": "UBERON:0002107"})


def test_bad_input_errors_name_the_column() -> None:
    adata = _two_references()
    with pytest.raises(OntologyError, match="'author_label'"):
        apply_ontology(adata, label_column="author_label")
    adata.obs.loc["c3", schema.ORIGINAL_LABEL] = np.nan
    with pytest.raises(OntologyError, match=f"'{schema.ORIGINAL_LABEL}'.*c3"):
        apply_ontology(adata)
    with pytest.raises(ValueError):
        map_label("   ")


def test_ontology_loads_without_network() -> None:
    code = (
        "import socket\n"
        "def _no(*a, **k): raise RuntimeError('network used')\n"
        "class _S(socket.socket):\n"
        "    connect = connect_ex = sendto = _no\n"
        "socket.socket = _S; socket.create_connection = _no; socket.getaddrinfo = _no\n"
        "from spatial_assets.celltyping.ontology import map_label\n"
        "print(map_label('Astrocytes').ontology_term_id)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "CL:0000127"


def test_every_curated_pattern_points_at_a_current_cl_term(parser: OntologyParser) -> None:
    from spatial_assets.celltyping.ontology import _PATTERNS

    for _, tid in _PATTERNS:
        assert tid.startswith("CL:") and not parser.is_term_deprecated(tid), tid


def test_deprecated_terms_are_never_returned(parser: OntologyParser) -> None:
    assert parser.is_term_deprecated("CL:0000003")  # label "obsolete native cell"
    for label in ["obsolete native cell", "obsolete excitatory neuron", "obsolete inhibitory neuron"]:
        tid = map_label(label).ontology_term_id
        assert tid is None or not parser.is_term_deprecated(tid), (label, tid)
