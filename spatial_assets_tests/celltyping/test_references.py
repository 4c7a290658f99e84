"""Reading references down to a panel and combining them, on real files and synthetic h5ad files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.core.normalization import NormalizationError
from spatial_assets.celltyping.references import (
    DEFAULT_PLACEHOLDER_LABELS,
    ReferenceError,
    ReferenceSpec,
    combine_references,
    harmonize_gene_symbols,
    read_reference_subset,
    reference_fingerprint,
)
from spatial_assets.core.schema import CELL_TYPE_ONTOLOGY_ID, ORIGINAL_LABEL, REFERENCE_SOURCE



def make_ref(
    path: Path,
    labels: list[str] | np.ndarray,
    *,
    genes: list[str] | None = None,
    seed: int = 0,
    prefix: str = "cell",
    fmt: str = "csr",
    extra_obs: dict | None = None,
) -> ad.AnnData:
    """Poisson counts (genes G0..G49 by default) written to ``path``; returns what was written."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    genes = genes or [f"G{j}" for j in range(50)]
    counts = rng.poisson(rng.uniform(0.2, 3.0, size=(labels.size, len(genes)))).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[fmt](counts)
    obs = pd.DataFrame({"label": labels, "n_umi": counts.sum(1)}, index=[f"{prefix}{i}" for i in range(labels.size)])
    for k, v in (extra_obs or {}).items():
        obs[k] = v
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    path.parent.mkdir(parents=True, exist_ok=True)
    a.write_h5ad(path)
    return a


def expm1_row_sums(X) -> np.ndarray:
    Y = sp.csr_matrix(X, dtype=np.float64, copy=True)
    Y.data = np.expm1(Y.data)
    return np.asarray(Y.sum(axis=1)).ravel()


# ------------------------------------------------------------------------- read_reference_subset


def test_poa_reference_to_merfish_panel_matches_full_load(poa_reference_path, load_poa_reference, load_merfish) -> None:
    panel = list(load_merfish().var_names)
    full = load_poa_reference()
    expected_genes = [g for g in panel if g in set(full.var_names)]
    sub = read_reference_subset(str(poa_reference_path), panel, label_column="cell_type", chunk_size=97)
    assert list(sub.var_names) == expected_genes
    assert len(expected_genes) == 134  # the reference was cut to the 134 panel genes it shares
    assert sp.isspmatrix_csr(sub.X)
    assert (sub.X != full[:, expected_genes].X).nnz == 0
    assert list(sub.obs_names) == list(full.obs_names)
    assert list(sub.obs.columns) == ["cell_type"]
    assert sub.uns["reference_read"]["counts_source"] == "X"


@pytest.mark.parametrize("chunk", [29, 1000, 20_000])
def test_chunked_subset_equals_full_load_pbmc(chunk: int, pbmc_path, load_pbmc) -> None:
    full = load_pbmc()
    rng = np.random.default_rng(0)
    panel = list(rng.choice(full.var_names, 60, replace=False)) + ["NOT_A_GENE"]
    sub = read_reference_subset(str(pbmc_path), panel, label_column="seurat_annotations", chunk_size=chunk)
    assert list(sub.var_names) == panel[:60]  # panel order, missing gene dropped
    assert (sub.X != full[:, panel[:60]].X).nnz == 0
    assert sub.obs["seurat_annotations"].equals(full.obs["seurat_annotations"])


@pytest.mark.parametrize(("fmt", "chunk"), [("csr", 1), ("csr", 9), ("csc", 9), ("dense", 1), ("dense", 9)])
def test_chunked_subset_other_storage_formats(tmp_path: Path, fmt: str, chunk: int) -> None:
    a = make_ref(tmp_path / "r.h5ad", ["x"] * 40 + ["y"] * 40, fmt=fmt)
    panel = ["G7", "G3", "G40", "G3"]
    sub = read_reference_subset(str(tmp_path / "r.h5ad"), panel, label_column="label", chunk_size=chunk)
    expected = a[:, ["G7", "G3", "G40"]].X
    expected = expected.toarray() if sp.issparse(expected) else np.asarray(expected)
    np.testing.assert_array_equal(sub.X.toarray(), expected)


def test_missing_label_column_lists_available(tmp_path: Path) -> None:
    make_ref(tmp_path / "r.h5ad", ["x"] * 20)
    with pytest.raises(ReferenceError) as err:
        read_reference_subset(str(tmp_path / "r.h5ad"), ["G1"], label_column="celltype")
    msg = str(err.value)
    assert "'celltype'" in msg and "r.h5ad" in msg and "['label', 'n_umi']" in msg


def test_zero_shared_genes_ensembl_vs_symbols(tmp_path: Path) -> None:
    ens = [f"ENSMUSG{j:011d}" for j in range(50)]
    make_ref(tmp_path / "ens.h5ad", ["x"] * 20, genes=ens)
    with pytest.raises(ReferenceError) as err:
        read_reference_subset(str(tmp_path / "ens.h5ad"), ["Gad1", "Sst"], label_column="label")
    msg = str(err.value)
    assert "ens.h5ad" in msg and "Ensembl" in msg and "ENSMUSG00000000000" in msg and "Gad1" in msg

    make_ref(tmp_path / "sym.h5ad", ["x"] * 20)
    with pytest.raises(ReferenceError, match="the panel uses Ensembl ids .*reference uses gene symbols"):
        read_reference_subset(str(tmp_path / "sym.h5ad"), ens[:3], label_column="label")

    make_ref(tmp_path / "case.h5ad", ["x"] * 20, genes=["GAD1", "SST", "PVALB"])
    with pytest.raises(ReferenceError, match="2 genes match ignoring case"):
        read_reference_subset(str(tmp_path / "case.h5ad"), ["Gad1", "Sst"], label_column="label")


def test_ensembl_ids_mapped_through_feature_name(tmp_path: Path) -> None:
    ens = [f"ENSG{j:011d}" for j in range(50)]
    a = make_ref(tmp_path / "cxg.h5ad", ["x"] * 20, genes=ens)
    a.var["feature_name"] = pd.Categorical([f"SYM{j}" for j in range(50)])
    a.write_h5ad(tmp_path / "cxg.h5ad")
    sub = read_reference_subset(str(tmp_path / "cxg.h5ad"), ["SYM5", "SYM2", "SYM99"], label_column="label")
    assert list(sub.var_names) == ["SYM5", "SYM2"]
    assert list(sub.var["feature_id"]) == [ens[5], ens[2]]
    np.testing.assert_array_equal(sub.X.toarray(), a.X[:, [5, 2]].toarray())
    assert sub.uns["reference_read"]["gene_ids_were_ensembl"]


def test_harmonize_gene_symbols_columns() -> None:
    ids = ["ENSMUSG00000000001", "ENSMUSG00000000002.3", "ENSMUSG00000000003"]
    var = pd.DataFrame({"gene_symbols": ["Gad1", "", None]}, index=ids)
    assert harmonize_gene_symbols(var, ids) == ["Gad1", "ENSMUSG00000000002.3", "ENSMUSG00000000003"]
    var = pd.DataFrame({"gene_name": ["A", "B", "C"]}, index=ids)
    assert harmonize_gene_symbols(var, ids) == ["A", "B", "C"]
    # symbols already: untouched even when a symbol column exists
    var = pd.DataFrame({"feature_name": ["x", "y"]}, index=["Gad1", "Sst"])
    assert harmonize_gene_symbols(var, ["Gad1", "Sst"]) == ["Gad1", "Sst"]


def test_duplicate_cell_ids_rejected(tmp_path: Path) -> None:
    a = make_ref(tmp_path / "dup.h5ad", ["x"] * 20)
    a.obs_names = ["c0", "c0"] + [f"c{i}" for i in range(2, 20)]
    a.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.raises(ReferenceError, match=r"dup\.h5ad has 1 duplicate cell ids \(e\.g\. \['c0'\]\)"):
        read_reference_subset(str(tmp_path / "dup.h5ad"), ["G1"], label_column="label")


def test_counts_layer_preferred_over_log_x(tmp_path: Path) -> None:
    a = make_ref(tmp_path / "l.h5ad", ["x"] * 30)
    a.layers["counts"] = a.X.copy()
    a.X = a.X.copy()
    a.X.data = np.log1p(a.X.data)
    a.write_h5ad(tmp_path / "l.h5ad")
    sub = read_reference_subset(str(tmp_path / "l.h5ad"), ["G2", "G1"], label_column="label", chunk_size=4)
    assert sub.uns["reference_read"]["counts_source"] == "layers/counts"
    np.testing.assert_array_equal(sub.X.toarray(), a.layers["counts"][:, [2, 1]].toarray())


def test_raw_x_with_more_genes_supplies_counts(tmp_path: Path) -> None:
    a = make_ref(tmp_path / "raw.h5ad", ["x"] * 30)
    small = a[:, :20].copy()
    small.X = small.X.copy()
    small.X.data = np.log1p(small.X.data)
    small.raw = a  # raw has 50 genes, X only 20
    small.write_h5ad(tmp_path / "raw.h5ad")
    sub = read_reference_subset(str(tmp_path / "raw.h5ad"), ["G30", "G1"], label_column="label")
    assert sub.uns["reference_read"]["counts_source"] == "raw/X"
    assert list(sub.var_names) == ["G30", "G1"]  # G30 exists only in raw.var
    np.testing.assert_array_equal(sub.X.toarray(), a.X[:, [30, 1]].toarray())


def test_missing_file_is_reference_error(tmp_path: Path) -> None:
    with pytest.raises(ReferenceError, match="not found"):
        read_reference_subset(str(tmp_path / "nope.h5ad"), ["G1"], label_column="label")


# ------------------------------------------------------------------------- combine_references


def test_combine_same_name_placeholders_min_cells_and_ontology(tmp_path: Path) -> None:
    labels_a = ["T cell"] * 30 + ["B cell"] * 25 + ["Unknown"] * 12 + ["Unknown T cell"] * 15 + ["rare"] * 4
    labels_b = ["T cell"] * 20 + ["NK cell"] * 20 + ["doublet"] * 5 + ["N/A"] * 3
    ont_a = ["CL:0000084"] * 30 + ["CL:0000236"] * 25 + ["unknown"] * 12 + ["CL:0000084"] * 15 + ["CL:0000000"] * 4
    a = make_ref(tmp_path / "a" / "ref.h5ad", labels_a, extra_obs={CELL_TYPE_ONTOLOGY_ID: ont_a}, seed=1)
    make_ref(tmp_path / "b" / "ref.h5ad", labels_b, genes=[f"G{j}" for j in range(10, 60)], seed=2, prefix="other")
    panel = [f"G{j}" for j in range(60, 0, -1)]  # reversed order, G60 absent everywhere
    out = combine_references(
        [ReferenceSpec(str(tmp_path / "a" / "ref.h5ad"), "label"), ReferenceSpec(str(tmp_path / "b" / "ref.h5ad"), "label")],
        panel,
        min_cells_per_type=10,
    )
    shared = [f"G{j}" for j in range(49, 9, -1)]
    assert list(out.var_names) == shared
    assert list(out.obs[REFERENCE_SOURCE].cat.categories) == ["ref", "ref_2"]
    counts = out.obs.groupby([REFERENCE_SOURCE, ORIGINAL_LABEL], observed=True).size().to_dict()
    assert counts == {
        ("ref", "T cell"): 30,
        ("ref", "B cell"): 25,
        ("ref", "Unknown T cell"): 15,  # exact-match placeholder removal keeps this one
        ("ref_2", "T cell"): 20,
        ("ref_2", "NK cell"): 20,
    }
    # ontology ids of the first reference preserved, NaN for the second
    assert out.obs.loc[out.obs[REFERENCE_SOURCE] == "ref", CELL_TYPE_ONTOLOGY_ID].notna().all()
    assert out.obs.loc[out.obs[REFERENCE_SOURCE] == "ref_2", CELL_TYPE_ONTOLOGY_ID].isna().all()
    # no clash of cell ids (cell*, other*): names kept
    assert out.obs_names[0] == "cell0" and out.obs_names.is_unique
    # normalized over the shared genes; counts kept
    np.testing.assert_allclose(expm1_row_sums(out.X), 1e4, rtol=1e-5)
    keep_a = np.isin(labels_a, ["T cell", "B cell", "Unknown T cell"])
    np.testing.assert_array_equal(out.layers["counts"][: keep_a.sum()].toarray(), a[keep_a, shared].X.toarray())
    info = out.uns["references"]
    assert info["ref"]["n_cells_before"] == 86 and info["ref"]["n_cells_after"] == 70
    assert dict(zip(info["ref"]["removed_labels"], info["ref"]["removed_counts"])) == {"Unknown": 12, "rare": 4}
    assert info["ref_2"]["removed_reasons"] == ["placeholder", "placeholder"]
    assert info["ref"]["sha256"] == hashlib.sha256((tmp_path / "a" / "ref.h5ad").read_bytes()).hexdigest()
    assert info["ref_2"]["uri"].endswith(os.path.join("b", "ref.h5ad"))
    out.write_h5ad(tmp_path / "combined.h5ad")  # everything recorded is storable
    back = ad.read_h5ad(tmp_path / "combined.h5ad")
    assert back.uns["references"]["ref"]["n_cells_after"] == 70


def test_clashing_cell_ids_get_source_prefix(tmp_path: Path) -> None:
    make_ref(tmp_path / "one.h5ad", ["x"] * 15 + ["y"] * 15, seed=1)
    make_ref(tmp_path / "two.h5ad", ["x"] * 15 + ["y"] * 15, seed=2)
    out = combine_references(
        [ReferenceSpec(str(tmp_path / "one.h5ad"), "label"), ReferenceSpec(str(tmp_path / "two.h5ad"), "label", name="second")],
        ["G1", "G2", "G3"],
    )
    assert out.obs_names.is_unique and out.n_obs == 60
    assert out.obs_names[0] == "one:cell0" and out.obs_names[30] == "second:cell0"


def test_real_poa_reference_with_dataset_placeholders(poa_reference_path, load_poa_reference, load_merfish) -> None:
    panel = list(load_merfish().var_names)
    out = combine_references(
        [ReferenceSpec(str(poa_reference_path), "cell_type", organism="mouse")],
        panel,
        placeholder_labels=list(DEFAULT_PLACEHOLDER_LABELS) + ["Ambiguous", "Unstable"],
    )
    full = load_poa_reference()
    expected = full.obs["cell_type"].value_counts()
    expected = expected.drop(["Ambiguous", "Unstable"])
    expected = expected[expected >= 10]
    assert out.n_obs == int(expected.sum())
    assert set(out.obs[ORIGINAL_LABEL]) == set(expected.index)
    assert out.n_vars == 134
    np.testing.assert_allclose(expm1_row_sums(out.X)[np.asarray(out.layers["counts"].sum(1)).ravel() > 0], 1e4, rtol=1e-5)


def test_empty_after_filtering_names_file(tmp_path: Path) -> None:
    make_ref(tmp_path / "good.h5ad", ["x"] * 15 + ["y"] * 15)
    make_ref(tmp_path / "bad.h5ad", ["Unknown"] * 10 + ["tiny"] * 3)
    with pytest.raises(ReferenceError) as err:
        combine_references(
            [ReferenceSpec(str(tmp_path / "good.h5ad"), "label"), ReferenceSpec(str(tmp_path / "bad.h5ad"), "label")],
            ["G1", "G2"],
            min_cells_per_type=10,
        )
    msg = str(err.value)
    assert "bad.h5ad" in msg and "'Unknown' ×10 (placeholder)" in msg and "'tiny' ×3" in msg


def test_single_class_rejected(tmp_path: Path) -> None:
    make_ref(tmp_path / "r.h5ad", ["x"] * 30 + ["y"] * 5)
    with pytest.raises(ReferenceError, match="single cell type .*'x'.*at least 2 classes"):
        combine_references([ReferenceSpec(str(tmp_path / "r.h5ad"), "label")], ["G1", "G2"], min_cells_per_type=10)


def test_default_keeps_classes_down_to_three_cells(tmp_path: Path) -> None:
    """A class the query may contain must be in the model to be called at all: 3 cells are kept."""
    make_ref(tmp_path / "r.h5ad", ["x"] * 30 + ["y"] * 20 + ["three"] * 3 + ["two"] * 2)
    out = combine_references([ReferenceSpec(str(tmp_path / "r.h5ad"), "label")], ["G1", "G2", "G3"])
    kept = out.obs[ORIGINAL_LABEL].value_counts().to_dict()
    assert kept == {"x": 30, "y": 20, "three": 3}
    info = out.uns["references"]["r"]
    assert dict(zip(info["removed_labels"], info["removed_counts"])) == {"two": 2}
    assert info["removed_reasons"] == ["below_min_cells_per_type(3)"]


def test_log1p_cpm_reference_without_counts_refused(tmp_path: Path) -> None:
    a = make_ref(tmp_path / "cpm.h5ad", ["x"] * 15 + ["y"] * 15)
    X = sp.csr_matrix(a.X, dtype=np.float64)
    X = sp.diags(1e6 / np.asarray(X.sum(1)).ravel()) @ X
    X.data = np.log1p(X.data)
    a.X = sp.csr_matrix(X, dtype=np.float32)
    a.write_h5ad(tmp_path / "cpm.h5ad")
    with pytest.raises(NormalizationError, match=r"cpm\.h5ad.*log1p CPM"):
        combine_references([ReferenceSpec(str(tmp_path / "cpm.h5ad"), "label")], [f"G{j}" for j in range(50)])


def test_no_shared_gene_across_references(tmp_path: Path) -> None:
    make_ref(tmp_path / "p.h5ad", ["x"] * 15 + ["y"] * 15, genes=["A", "B"])
    make_ref(tmp_path / "q.h5ad", ["x"] * 15 + ["y"] * 15, genes=["C", "D"])
    with pytest.raises(ReferenceError, match=r"share no panel gene .*'p': 2, 'q': 2"):
        combine_references(
            [ReferenceSpec(str(tmp_path / "p.h5ad"), "label"), ReferenceSpec(str(tmp_path / "q.h5ad"), "label")],
            ["A", "B", "C", "D"],
        )


def test_reference_fingerprint(tmp_path: Path) -> None:
    make_ref(tmp_path / "f.h5ad", ["x"] * 5)
    fp = reference_fingerprint(str(tmp_path / "f.h5ad"))
    raw = (tmp_path / "f.h5ad").read_bytes()
    assert fp["sha256"] == hashlib.sha256(raw).hexdigest()
    assert fp["size"] == len(raw)
    assert fp["etag"]


def test_vstack_csr_matches_scipy_and_consumes_its_input() -> None:
    from spatial_assets.celltyping.references import vstack_csr

    rng = np.random.default_rng(0)
    blocks = [sp.random(n, 13, density=0.3, format="csr", dtype=np.float32, random_state=i) for i, n in enumerate((5, 0, 17, 1))]
    expected = sp.vstack(blocks, format="csr").toarray()
    parts = list(blocks)
    out = vstack_csr(parts)
    assert parts == [] and out.shape == (23, 13) and out.dtype == np.float32
    np.testing.assert_array_equal(out.toarray(), expected)
    del rng
