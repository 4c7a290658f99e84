"""The audit chain (no Dagster): a sample's recorded provenance compared link by link with storage.

Every annotations object carries ``uns['provenance']``: which reference files (by hash) built which
training set (by content hash), which model (by sha256) was trained on it, and which run applied
it. ``audit_sample`` re-reads that chain from storage and compares each link with what storage
holds now, so a user can tell whether a call is still what the current references would produce.
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

    @property
    def stale(self) -> bool:
        return self.recorded != self.current


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
            state = "STALE" if link.stale else "ok"
            lines.append(f"  [{state}] {link.name}: recorded={link.recorded} current={link.current} {link.detail}".rstrip())
        lines.append("status: " + ("STALE — upstream changed since these calls were made" if self.stale else "up to date"))
        return "\n".join(lines)


def audit_sample(
    store: Store,
    sample_id: str,
    *,
    annotations_key: str,
    model_card_key: str,
    reference_record_key: str,
    fingerprint: Any = None,
) -> AuditReport:
    """Compare a sample's recorded chain with the current objects in ``store``.

    ``model_card_key`` may contain ``{panel}``: the panel recorded in the provenance (each panel
    has its own model, so the current model to compare with is that panel's).
    ``reference_record_key`` is a format string with ``{id}``; ``fingerprint(uri)`` (optional)
    returns the current sha256 of a reference file so an edit made outside the platform shows up.
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
    return report
