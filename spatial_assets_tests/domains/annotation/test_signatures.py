"""Signature files (strict YAML, bundled sets) and per-cell signature scores (domains/annotation/signatures.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.core.normalization import ensure_normalized
from spatial_assets.domains.annotation import (
    SIGNATURE_SCORES_OBSM,
    DomainAnnotationError,
    SignatureError,
    bundled_signatures_path,
    load_signatures,
    score_signatures,
)
from spatial_assets_tests.domains.annotation.helpers import SYN_SIGNATURES, _synthetic


def test_bundled_signatures_cover_panels(load_starmap, load_merfish, load_pbmc) -> None:
    mouse = load_signatures("mouse_brain")
    assert all(len(g) > 0 and all(isinstance(x, str) for x in g) for g in mouse.values())
    star = set(load_starmap().var_names)
    merf = set(load_merfish().var_names)
    covered_star = {k for k, g in mouse.items() if star & set(g)}
    covered_merf = {k for k, g in mouse.items() if merf & set(g)}
    # the cell classes each panel was designed to resolve
    assert {"Excitatory neurons", "Inhibitory neurons", "Astrocytes", "Oligodendrocytes",
            "Endothelial", "L2-3 IT neurons", "L5 neurons", "L6 neurons"} <= covered_star
    assert {"Excitatory neurons", "Inhibitory neurons", "Astrocytes", "Oligodendrocytes", "OPC",
            "Microglia", "Endothelial", "Mural cells", "Ependymal"} <= covered_merf
    human = load_signatures(bundled_signatures_path("human_immune"))
    pbmc = set(load_pbmc().var_names)
    covered = {k for k, g in human.items() if pbmc & set(g)}
    assert {"B cells", "NK cells", "Classical monocytes", "Non-classical monocytes",
            "Platelets", "Dendritic cells"} <= covered


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("Astro: [Aqp4\n  Gfap: [", "not valid YAML"),
        ("- Aqp4\n- Gfap\n", "non-empty mapping"),
        ("Astro: []\n", "'Astro' must be a non-empty list"),
        ("Astro: Aqp4\n", "'Astro' must be a non-empty list"),
        ("Astro: [Aqp4, 12]\n", "'Astro' has a gene 12"),
        ("Astro: [Aqp4, NO]\n", "'Astro' has a gene False"),
        ("Astro: [Aqp4]\nAstro: [Gfap]\n", "duplicate key 'Astro'"),
        ("L2/3: [Cux2]\n", "contains '/'"),
    ],
)
def test_bad_signature_yaml_names_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad_signatures.yaml"
    path.write_text(text)
    with pytest.raises(SignatureError) as err:
        load_signatures(path)
    assert str(path) in str(err.value)
    assert fragment in str(err.value)


def test_missing_signature_file_and_unknown_bundle(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="does not exist"):
        load_signatures(tmp_path / "nope.yaml")
    with pytest.raises(SignatureError, match="no bundled signature set"):
        bundled_signatures_path("zebrafish")


def test_load_signatures_dedupes_and_strips() -> None:
    sigs = load_signatures({" T ": ["Cd3e", "Cd3e ", "Cd4"]})
    assert sigs == {"T": ["Cd3e", "Cd4"]}


def test_scores_shape_missing_genes_and_caller_untouched(starmap: ad.AnnData) -> None:
    sigs = load_signatures("mouse_brain")
    panel = set(starmap.var_names)
    expected = [k for k, g in sigs.items() if panel & set(g)]
    x_before = starmap.X.copy()
    with pytest.warns(UserWarning) as rec:
        scored = score_signatures(starmap, "mouse_brain")
    messages = " | ".join(str(r.message) for r in rec)
    assert "Ependymal" in messages and "Gfap" in messages
    scores = scored.obsm[SIGNATURE_SCORES_OBSM]
    assert scores.shape == (starmap.n_obs, len(expected))
    assert list(scores.columns) == expected
    assert np.isfinite(scores.to_numpy()).all()
    info = scored.uns["signature_scoring"]
    assert list(info["dropped_signatures"]) == ["Ependymal"]
    missing = set(map(tuple, info["missing_genes"].to_numpy()))
    assert ("Astrocytes", "Gfap") in missing and ("Astrocytes", "Aqp4") not in missing
    # caller not modified
    assert SIGNATURE_SCORES_OBSM not in starmap.obsm and "signature_scoring" not in starmap.uns
    assert (starmap.X != x_before).nnz == 0


def test_zscore_score_is_mean_z_of_present_genes(starmap: ad.AnnData) -> None:
    sig = {"L6": ["Foxp2", "Syt6", "Tbr1", "NotAGene"]}
    with pytest.warns(UserWarning, match="NotAGene"):
        scored = score_signatures(starmap, sig)
    x = ensure_normalized(starmap)[:, ["Foxp2", "Syt6", "Tbr1"]].X
    x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    np.testing.assert_allclose(scored.obsm[SIGNATURE_SCORES_OBSM]["L6"], z.mean(axis=1),
                               rtol=1e-5, atol=1e-5)


def test_all_signatures_missing_is_an_error(starmap: ad.AnnData, tmp_path: Path) -> None:
    path = tmp_path / "human.yaml"
    path.write_text("T cells: [CD3E, CD2]\nB cells: [MS4A1]\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(SignatureError) as err:
            score_signatures(starmap, path)
    assert str(path) in str(err.value) and "T cells" in str(err.value)


def test_smoothing_is_mean_over_self_and_neighbours() -> None:
    a = _synthetic()
    n = a.n_obs
    # ring graph: each cell linked to the next (symmetric), weights deliberately not 1
    rows = np.arange(n)
    g = sp.coo_matrix((np.full(n, 0.3), (rows, (rows + 1) % n)), shape=(n, n))
    a.obsp["spatial_connectivities"] = (g + g.T).tocsr()
    raw = score_signatures(a, SYN_SIGNATURES).obsm[SIGNATURE_SCORES_OBSM].to_numpy()
    smooth = score_signatures(a, SYN_SIGNATURES, smooth=True).obsm[SIGNATURE_SCORES_OBSM]
    expected = (np.roll(raw, 1, axis=0) + raw + np.roll(raw, -1, axis=0)) / 3.0
    np.testing.assert_allclose(smooth.to_numpy(), expected, rtol=1e-10, atol=1e-12)
    del a.obsp["spatial_connectivities"]
    with pytest.raises(DomainAnnotationError, match="spatial_connectivities"):
        score_signatures(a, SYN_SIGNATURES, smooth=True)


def test_scanpy_method_is_seeded() -> None:
    a = _synthetic()
    s1 = score_signatures(a, SYN_SIGNATURES, method="scanpy", seed=3).obsm[SIGNATURE_SCORES_OBSM]
    s2 = score_signatures(a, SYN_SIGNATURES, method="scanpy", seed=3).obsm[SIGNATURE_SCORES_OBSM]
    pd.testing.assert_frame_equal(s1, s2)
    # both recover the generating type; on a 40-gene panel scanpy's expression bins hold other
    # types' markers as controls, which is why the z-score method is the default
    zs = score_signatures(a, SYN_SIGNATURES).obsm[SIGNATURE_SCORES_OBSM]
    truth = a.obs["cell_type"].to_numpy()
    acc_z = (zs.idxmax(axis=1).to_numpy() == truth).mean()
    acc_sc = (s1.idxmax(axis=1).to_numpy() == truth).mean()
    assert acc_z > 0.99 and acc_sc > 0.85 and acc_z >= acc_sc
