"""Gene panels: a stable id from the gene list alone, readable names, the configured override."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from spatial_assets.core.ids import InvalidIdError
from spatial_assets.platform.manifest import DuplicateReferenceError, ReferenceEntry, with_entry
from spatial_assets.platform.panels import Panel, PanelError, missing_genes, panel_id, panel_name, sample_panel, validate_panel_id


def _adata(genes: list[str]) -> ad.AnnData:
    return ad.AnnData(np.ones((3, len(genes)), dtype=np.float32), var=pd.DataFrame(index=genes))


def test_panel_id_depends_on_the_gene_set_only():
    pid = panel_id(["Gad1", "Slc17a6", "Aqp4"])
    assert pid == panel_id(["Aqp4", "Gad1", "Slc17a6", "Gad1"])  # order and repeats do not matter
    assert pid != panel_id(["Aqp4", "Gad1"]) and pid != panel_id(["aqp4", "Gad1", "Slc17a6"])
    assert validate_panel_id(pid) == pid and len(pid) == 14 and pid.startswith("p-")
    # the documented construction: sha256 of the sorted names joined by newlines
    import hashlib

    assert pid == "p-" + hashlib.sha256(b"Aqp4\nGad1\nSlc17a6").hexdigest()[:12]
    with pytest.raises(PanelError):
        panel_id([])


@pytest.mark.parametrize("bad", ["p-123", "p-ABCDEFABCDEF", "x-0123456789ab", "p-0123456789ab/..", "poa"])
def test_panel_ids_are_validated(bad):
    with pytest.raises(InvalidIdError, match="panel id"):
        validate_panel_id(bad)


def test_readable_name():
    assert panel_name(["Sst", "Gad1", "Aqp4", "Pdgfra"]) == "4 genes (Aqp4, Gad1, Pdgfra, …)"
    assert panel_name(["Sst", "Gad1"]) == "2 genes (Gad1, Sst)"


def test_sample_panel_drops_control_probes_and_honours_the_configured_panel():
    a = _adata(["Gad1", "Blank-1", "NegControlProbe_01", "Aqp4"])
    own = sample_panel(a, sample_id="s1")
    assert own.genes == ("Aqp4", "Gad1") and own.source == "sample" and own.id == panel_id(["Gad1", "Aqp4"])
    configured = sample_panel(a, ["Gad1", "Sst"], sample_id="s1")
    assert configured.genes == ("Gad1", "Sst") and configured.source == "configured"
    assert missing_genes(configured.genes, a.var_names) == ["Sst"]
    with pytest.raises(PanelError, match="'s_blank'"):
        sample_panel(_adata(["Blank-1"]), sample_id="s_blank")


def test_panel_record_round_trip_is_verified():
    panel = Panel.from_genes(["Gad1", "Aqp4"])
    assert Panel.from_record(panel.to_record()) == panel
    tampered = {**panel.to_record(), "genes": ["Gad1", "Sst"]}
    with pytest.raises(PanelError, match="hash to"):
        Panel.from_record(tampered)


def test_manifest_with_entry_refuses_duplicates_unless_replace():
    a = ReferenceEntry(id="a", uri="s3://b/a.h5ad", label_column="cell_type")
    b = ReferenceEntry(id="b", uri="s3://b/b.h5ad", label_column="label")
    entries = with_entry([a], b)
    assert [e.id for e in entries] == ["a", "b"]
    with pytest.raises(DuplicateReferenceError, match="'a' is already in the manifest"):
        with_entry(entries, ReferenceEntry(id="a", uri="s3://b/other.h5ad", label_column="x"))
    replaced = with_entry(entries, ReferenceEntry(id="a", uri="s3://b/other.h5ad", label_column="x"), replace=True)
    assert [(e.id, e.uri) for e in replaced] == [("a", "s3://b/other.h5ad"), ("b", "s3://b/b.h5ad")]
    with pytest.raises(InvalidIdError):
        with_entry(entries, ReferenceEntry(id="../x", uri="u", label_column="c"))
