"""The audit chain (no Dagster): a sample's recorded provenance compared link by link with storage.

Every annotations object carries ``uns['provenance']``: which reference files (by hash) built which
training set (by content hash), which model (by sha256) was trained on it, and which run applied
it. ``audit_sample`` re-reads that chain from storage and compares each link with what storage
holds now, so a user can tell whether a call is still what the current references would produce.

A sample segmented from a raw instrument folder also carries the chain before its cells: every raw
file (sha256), the segmentation (platform, method, parameters, versions, content hash of the
segmented cells) and the QC; each raw file is compared with the ``raw_sample`` record (what the
platform registered) and, when a ``fingerprint`` function is given, with the bytes in the landing
area now, so a raw file re-landed with other bytes shows STALE before anything is re-run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from spatial_assets.core.lineage import read_provenance


class Store(Protocol):
    def exists(self, key: str) -> bool: ...
    def read_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str) -> Any: ...


@dataclass
class AuditLink:
    name: str
    recorded: str | None
    current: str | None
    detail: str = ""
    absent: bool = False  # the downstream object is not materialized (yet): nothing to compare, not stale

    @property
    def stale(self) -> bool:
        return not self.absent and self.recorded != self.current


@dataclass
class AuditReport:
    sample_id: str
    provenance: dict[str, Any]
    links: list[AuditLink] = field(default_factory=list)

    @property
    def stale(self) -> bool:
        return any(link.stale for link in self.links)

    def format(self) -> str:
        p = self.provenance
        lines = [f"sample {self.sample_id}"]
        lines += _raw_lines(p)
        for rid, ref in sorted((p.get("references") or {}).items()):
            lines.append(f"  reference {rid}: {ref.get('uri')}  sha256={ref.get('sha256')}")
        ts = p.get("training_set") or {}
        panel = p.get("panel") or {}
        if panel:
            lines.append(f"  panel {panel.get('id')}: {panel.get('name')}")
        lines.append(f"  -> training set  content_sha256={ts.get('content_sha256')}  cells={ts.get('n_cells')}")
        model = p.get("model") or {}
        lines.append(f"  -> model         sha256={model.get('sha256')}")
        sample = p.get("sample") or {}
        lines.append(f"  -> spatial cells sha256={sample.get('spatial_cells_sha256')}")
        lines.append(f"  -> annotations   run_id={p.get('run_id')}")
        lines.append("checks against current storage:")
        for link in self.links:
            state = "absent" if link.absent else "STALE" if link.stale else "ok"
            lines.append(f"  [{state}] {link.name}: recorded={link.recorded} current={link.current} {link.detail}".rstrip())
        lines.append("status: " + ("STALE — upstream changed since these calls were made" if self.stale else "up to date"))
        return "\n".join(lines)


def _raw_lines(p: dict[str, Any]) -> list[str]:
    from spatial_assets.platform.raw_samples import lineage_files

    raw = p.get("raw") or {}
    if not raw:
        return []
    files = lineage_files(raw)
    lines = [f"  raw folder {raw.get('landing_uri')} ({raw.get('platform')}, {len(files)} files)"]
    lines += [f"    {f['path']}  sha256={f.get('sha256')}  size={f.get('size')}" for f in files]
    seg = p.get("segmentation") or {}
    versions = seg.get("versions") or {}
    shown = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if k in ("sopa", "spatialdata", "scikit-image", "geopandas"))
    params = seg.get("parameters") or {}
    short = ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if not isinstance(v, (dict, list)))[:200]
    lines.append(f"  -> segmentation  method={seg.get('method')} platform={seg.get('platform')} cells_sha256={seg.get('cells_sha256')}")
    lines.append(f"                   parameters: {short or '-'}")
    lines.append(f"                   versions: {shown or '-'}")
    qc = p.get("cell_qc") or {}
    if qc:
        lines.append(f"  -> cell QC       cells {qc.get('n_cells_in')} → {qc.get('n_cells_out')} (filters: "
                     + ", ".join(f"{k}={v}" for k, v in sorted((qc.get("filters") or {}).items())) + ")")
    return lines


def _raw_links(store: Store, sample_id: str, prov: dict[str, Any], raw_record_key: str | None,
               segmented_key: str | None, fingerprint: Any) -> list[AuditLink]:
    """Each raw file against the registered raw_sample record and (``fingerprint``) the landing area;
    the segmentation against the stored segmented cells."""
    from spatial_assets.platform.raw_samples import lineage_files

    raw = prov.get("raw") or {}
    if not raw:
        return []
    links: list[AuditLink] = []
    record: dict[str, Any] = {}
    if raw_record_key is not None:
        key = raw_record_key.format(id=sample_id)
        record = json.loads(store.read_bytes(key)) if store.exists(key) else {}
    registered = record.get("files") or {}
    recorded = lineage_files(raw)
    for f in recorded:
        if raw_record_key is not None:
            links.append(AuditLink(f"raw file {f['path']} (registered)", f.get("sha256"), (registered.get(f["path"]) or {}).get("sha256")))
        if fingerprint is not None and f.get("uri"):
            try:
                now, detail = fingerprint(f["uri"]), ""
            except Exception as exc:  # a deleted or unreachable raw file is itself a finding
                now, detail = None, f"({type(exc).__name__}: {exc})"
            links.append(AuditLink(f"raw file {f['path']} (file at {f['uri']})", f.get("sha256"), now, detail))
    for rel in sorted(set(registered) - {f["path"] for f in recorded}):
        links.append(AuditLink(f"raw file {rel} (registered since)", None, registered[rel].get("sha256")))
    if segmented_key is not None:
        seg = prov.get("segmentation") or {}
        current = _stored_cells_sha256(store, segmented_key.format(id=sample_id))
        links.append(AuditLink("segmentation (segmented_cells)", seg.get("cells_sha256"), current))
    return links


def _stored_cells_sha256(store: Store, key: str) -> str | None:
    """``uns['segmentation']['cells_sha256']`` of a stored h5ad, without loading its matrix."""
    if not store.exists(key):
        return None
    import anndata as ad
    import h5py

    with h5py.File(store.get_file(key), "r") as f:
        node = f.get("uns/segmentation/cells_sha256")
        return None if node is None else str(ad.io.read_elem(node))


def audit_sample(
    store: Store,
    sample_id: str,
    *,
    annotations_key: str,
    model_card_key: str,
    reference_record_key: str,
    fingerprint: Any = None,
    sample_keys: SampleKeys | None = None,
    landing_fingerprint: Any = None,
    raw_record_key: str | None = None,
    segmented_key: str | None = None,
) -> AuditReport:
    """Compare a sample's recorded chain with the current objects in ``store``.

    ``model_card_key`` may contain ``{panel}``: the panel recorded in the provenance (each panel
    has its own model, so the current model to compare with is that panel's).
    ``reference_record_key`` is a format string with ``{id}``; ``fingerprint(uri)`` (optional)
    returns the current sha256 of a reference (or raw) file so an edit made outside the platform
    shows up. ``sample_keys`` (optional) adds the sample's own links (:func:`sample_links`): landed file →
    spatial_cells → annotations / domains → summaries; ``landing_fingerprint(sample_id)`` returns
    the fingerprint of what is landed now (None when nothing is). ``raw_record_key`` / ``segmented_key``
    (format strings with ``{id}``, the sample id): where the ``raw_sample`` record and the segmented
    cells are stored, for a sample that came from a raw folder (ignored otherwise).
    """
    if not store.exists(annotations_key):
        raise FileNotFoundError(f"no annotations stored for sample {sample_id!r} (looked for {annotations_key})")
    prov = read_provenance(store.get_file(annotations_key))
    report = AuditReport(sample_id=sample_id, provenance=prov)
    if "{panel}" in model_card_key:
        panel_id = (prov.get("panel") or {}).get("id")
        if not panel_id:
            raise ValueError(f"annotations of sample {sample_id!r} ({annotations_key}) record no panel: re-materialize them")
        model_card_key = model_card_key.format(panel=panel_id)
    card = json.loads(store.read_bytes(model_card_key)) if store.exists(model_card_key) else {}
    report.links.append(AuditLink("model", (prov.get("model") or {}).get("sha256"), card.get("sha256")))
    current_ts = (card.get("training_set") or {}).get("content_sha256")
    report.links.append(
        AuditLink("training set", (prov.get("training_set") or {}).get("content_sha256"), current_ts)
    )
    for rid, ref in sorted((prov.get("references") or {}).items()):
        key = reference_record_key.format(id=rid)
        current = json.loads(store.read_bytes(key)).get("sha256") if store.exists(key) else None
        report.links.append(AuditLink(f"reference {rid} (registered)", ref.get("sha256"), current))
        if fingerprint is not None and ref.get("uri"):
            try:
                now = fingerprint(ref["uri"])
            except Exception as exc:  # unreachable file is itself a finding
                now, detail = None, f"({exc})"
            else:
                detail = ""
            report.links.append(AuditLink(f"reference {rid} (file at {ref['uri']})", ref.get("sha256"), now, detail))
    report.links.extend(_raw_links(store, sample_id, prov, raw_record_key, segmented_key, fingerprint))
    if sample_keys is not None:
        report.links.extend(sample_links(store, sample_id, prov, sample_keys, landing_fingerprint=landing_fingerprint))
    return report


# -- the sample's own chain --------------------------------------------------------------------

@dataclass(frozen=True)
class SampleKeys:
    """Where each per-sample object (and the shared domain model's card) is stored."""

    spatial_cells: str
    spatial_domains: str
    domain_model_card: str
    cell_type_summary: str
    domain_composition: str
    domain_markers: str


MISSING = "(not stored)"


def sample_links(
    store: Store, sample_id: str, provenance: dict[str, Any], keys: SampleKeys, *, landing_fingerprint: Any = None
) -> list[AuditLink]:
    """Every link of the sample's chain, each recorded identity against the current one.

    An object records the identity of what it was computed from (``uns['lineage']`` /
    ``DataFrame.attrs['lineage']``, the annotations' ``uns['provenance']``, the landed file's
    fingerprint in ``spatial_cells``): a sample landed again with other content makes every link
    downstream of the change STALE until each object is re-materialized.
    """
    links: list[AuditLink] = []
    cells = _uns(store, keys.spatial_cells, ("content_sha256", "landing_fingerprint"))
    cells_sha = cells.get("content_sha256") if cells is not None else MISSING  # annotations without cells: STALE
    # a sample segmented from a raw folder has a link per raw file instead (_raw_links): one STALE line per change
    if cells is not None and landing_fingerprint is not None and cells.get("landing_fingerprint") and not provenance.get("raw"):
        now = landing_fingerprint(sample_id)
        links.append(AuditLink("landed file -> spatial_cells", cells.get("landing_fingerprint"), now,
                               "" if now is not None else "(nothing landed for this sample any more)"))
    links.append(AuditLink("spatial_cells -> annotations", (provenance.get("sample") or {}).get("spatial_cells_sha256"), cells_sha))
    annotations_run = provenance.get("run_id")
    domains = _uns(store, keys.spatial_domains, ("lineage",))
    domains_lineage = (domains or {}).get("lineage") or {}
    domains_run = domains_lineage.get("run_id")
    if domains is None:
        links.append(AuditLink("spatial_cells -> spatial_domains", None, None, "(not materialized for this sample)", absent=True))
    else:
        links.append(AuditLink("spatial_cells -> spatial_domains", domains_lineage.get("spatial_cells_content_sha256"), cells_sha))
        card = json.loads(store.read_bytes(keys.domain_model_card)) if store.exists(keys.domain_model_card) else {}
        links.append(AuditLink("domain model -> spatial_domains", domains_lineage.get("domain_model_sha256"), card.get("sha256", MISSING)))
    for name, key, inputs in (
        ("cell_type_summary", keys.cell_type_summary, {"annotations": ("cell_type_annotations_run_id", annotations_run)}),
        ("domain_composition", keys.domain_composition, {"annotations": ("cell_type_annotations_run_id", annotations_run),
                                                         "spatial_domains": ("spatial_domains_run_id", domains_run)}),
        ("domain_markers", keys.domain_markers, {"spatial_domains": ("spatial_domains_run_id", domains_run)}),
    ):
        recorded = _parquet_lineage(store, key)
        for upstream, (field_name, current) in inputs.items():
            if recorded is None:
                links.append(AuditLink(f"{upstream} -> {name}", None, None, "(not materialized for this sample)", absent=True))
            else:
                links.append(AuditLink(f"{upstream} -> {name}", recorded.get(field_name), current, "(run ids)"))
    return links


def _uns(store: Store, key: str, names: tuple[str, ...]) -> dict[str, Any] | None:
    """Small ``uns`` entries of a stored h5ad, read without loading its matrix (None: not stored)."""
    if not store.exists(key):
        return None
    import anndata as ad
    import h5py

    from spatial_assets.core.lineage import _to_builtin

    out: dict[str, Any] = {}
    with h5py.File(store.get_file(key), "r") as f:
        for name in names:
            if "uns" in f and name in f["uns"]:
                value = _to_builtin(ad.io.read_elem(f["uns"][name]))
                out[name] = value.decode() if isinstance(value, bytes) else value
    return out


def _parquet_lineage(store: Store, key: str) -> dict[str, Any] | None:
    """``attrs['lineage']`` of a stored parquet table, from its footer only (None: not stored)."""
    if not store.exists(key):
        return None
    import pyarrow.parquet as pq

    from spatial_assets.core.lineage import LINEAGE

    meta = pq.read_schema(store.get_file(key)).metadata or {}
    attrs = json.loads(meta.get(b"PANDAS_ATTRS", b"{}"))
    return dict(attrs.get(LINEAGE) or {})
