"""The audit's sample chain on hand-made objects: every link compared, absent objects not stale."""

import io
import json

import anndata as ad
import numpy as np
import pandas as pd

from spatial_assets.platform.audit import SampleKeys, audit_sample
from spatial_assets.storage.stores import LocalStore

KEYS = SampleKeys(
    spatial_cells="assets/spatial_cells/s.h5ad",
    spatial_domains="assets/spatial_domains/s.h5ad",
    domain_model_card="assets/domain_model.zip.card.json",
    cell_type_summary="assets/cell_type_summary/s.parquet",
    domain_composition="assets/domain_composition/s.parquet",
    domain_markers="assets/domain_markers/s.parquet",
)


def _h5ad(store: LocalStore, key: str, uns: dict) -> None:
    a = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    a.uns.update(uns)
    path = store.root / "tmp.h5ad"
    a.write_h5ad(path)
    store.put_file(path, key)
    path.unlink()


def _parquet(store: LocalStore, key: str, lineage: dict) -> None:
    table = pd.DataFrame({"n": [1]})
    table.attrs["lineage"] = lineage
    buf = io.BytesIO()
    table.to_parquet(buf)
    store.write_bytes(key, buf.getvalue())


def _audit(store: LocalStore, landed: str | None = "fp1"):
    return audit_sample(store, "s", annotations_key="assets/cell_type_annotations/s.h5ad",
                        model_card_key="assets/celltype_model/{panel}.pkl.card.json",
                        reference_record_key="assets/reference_atlas/{id}.json",
                        sample_keys=KEYS, landing_fingerprint=lambda sid: landed)


def test_every_link_of_the_sample_chain_is_compared(tmp_path):
    store = LocalStore(tmp_path)
    store.write_bytes("assets/celltype_model/p-1.pkl.card.json", json.dumps({"sha256": "m1"}).encode())
    _h5ad(store, KEYS.spatial_cells, {"content_sha256": "c1", "landing_fingerprint": "fp1"})
    _h5ad(store, "assets/cell_type_annotations/s.h5ad",
          {"provenance": {"panel": {"id": "p-1"}, "model": {"sha256": "m1"}, "sample": {"spatial_cells_sha256": "c1"}, "run_id": "r-ann"}})
    _parquet(store, KEYS.cell_type_summary, {"cell_type_annotations_run_id": "r-ann"})
    report = _audit(store)
    links = {link.name: link for link in report.links}
    assert not report.stale, report.format()
    assert links["landed file -> spatial_cells"].recorded == "fp1" and links["spatial_cells -> annotations"].current == "c1"
    assert links["annotations -> cell_type_summary"].current == "r-ann"
    # domains not materialized (a deployment without them): shown absent, not stale
    assert links["spatial_cells -> spatial_domains"].absent and links["spatial_domains -> domain_markers"].absent
    assert "[absent] spatial_cells -> spatial_domains" in report.format() and "status: up to date" in report.format()
    # the domains arrive; then each change upstream makes exactly its links stale
    store.write_bytes(KEYS.domain_model_card, json.dumps({"sha256": "d1"}).encode())
    _h5ad(store, KEYS.spatial_domains, {"lineage": {"run_id": "r-dom", "spatial_cells_content_sha256": "c1", "domain_model_sha256": "d1"}})
    _parquet(store, KEYS.domain_composition, {"cell_type_annotations_run_id": "r-ann", "spatial_domains_run_id": "r-dom"})
    _parquet(store, KEYS.domain_markers, {"spatial_domains_run_id": "r-dom"})
    assert not _audit(store).stale

    def stale(report) -> list[str]:
        return sorted(link.name for link in report.links if link.stale)

    assert stale(_audit(store, landed="fp2")) == ["landed file -> spatial_cells"]
    assert stale(_audit(store, landed=None)) == ["landed file -> spatial_cells"]
    _h5ad(store, KEYS.spatial_cells, {"content_sha256": "c2", "landing_fingerprint": "fp1"})
    assert stale(_audit(store)) == ["spatial_cells -> annotations", "spatial_cells -> spatial_domains"]
    _h5ad(store, KEYS.spatial_cells, {"content_sha256": "c1", "landing_fingerprint": "fp1"})
    store.write_bytes(KEYS.domain_model_card, json.dumps({"sha256": "d2"}).encode())
    assert stale(_audit(store)) == ["domain model -> spatial_domains"]
    store.write_bytes(KEYS.domain_model_card, json.dumps({"sha256": "d1"}).encode())
    _h5ad(store, KEYS.spatial_domains, {"lineage": {"run_id": "r-dom2", "spatial_cells_content_sha256": "c1", "domain_model_sha256": "d1"}})
    assert stale(_audit(store)) == ["spatial_domains -> domain_composition", "spatial_domains -> domain_markers"]
