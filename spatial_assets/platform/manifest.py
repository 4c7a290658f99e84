"""The references manifest: the source of truth for which reference atlases the platform trains on.

It is a small YAML file living in the storage root (``manifests/references.yaml``) so that adding or
editing a reference is one reviewed write, and a sensor can diff it cheaply on every tick::

    references:
      - id: poa_moffitt2018
        uri: s3://spatial-assets/raw/references/poa.h5ad
        label_column: cell_type
        organism: mouse                     # optional
        target_proportions: {Microglia: 0.05}  # optional, per training class
        placeholder_labels: [Ambiguous]     # optional, removed in addition to the defaults
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from spatial_assets.core.ids import validate_id


#: where the manifest lives in the storage root (the default of ``PlatformSettings.manifest_key``)
MANIFEST_KEY = "manifests/references.yaml"


class ManifestError(ValueError):
    """The references manifest is malformed."""


class DuplicateReferenceError(ManifestError):
    """``reference add`` for an id the manifest already lists (without ``replace``)."""


@dataclass(frozen=True)
class ReferenceEntry:
    id: str
    uri: str
    label_column: str
    organism: str | None = None
    target_proportions: dict[str, float] = field(default_factory=dict)
    placeholder_labels: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_manifest(text: str | bytes, source: str = "references manifest") -> list[ReferenceEntry]:
    """Parse and validate the YAML text; every problem names the entry and the field."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("references", []), list):
        raise ManifestError(f"{source}: expected a mapping with a 'references' list")
    entries: list[ReferenceEntry] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc.get("references") or []):
        where = f"{source}: references[{i}]"
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: expected a mapping, got {type(raw).__name__}")
        unknown = set(raw) - {"id", "uri", "label_column", "organism", "target_proportions", "placeholder_labels"}
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {sorted(unknown)}")
        for key in ("id", "uri", "label_column"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise ManifestError(f"{where}: missing or empty '{key}'")
        try:
            rid = validate_id(raw["id"], "reference id")
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from exc
        if rid in seen:
            raise ManifestError(f"{where}: duplicate reference id {rid!r}")
        seen.add(rid)
        props = raw.get("target_proportions") or {}
        if not isinstance(props, dict) or not all(isinstance(v, (int, float)) for v in props.values()):
            raise ManifestError(f"{where}: target_proportions must map class name -> number")
        placeholders = raw.get("placeholder_labels") or []
        if not isinstance(placeholders, list) or not all(isinstance(v, str) for v in placeholders):
            raise ManifestError(f"{where}: placeholder_labels must be a list of strings")
        entries.append(
            ReferenceEntry(
                id=rid,
                uri=raw["uri"].strip(),
                label_column=raw["label_column"],
                organism=raw.get("organism"),
                target_proportions={str(k): float(v) for k, v in props.items()},
                placeholder_labels=list(placeholders),
            )
        )
    return entries


def dump_manifest(entries: list[ReferenceEntry]) -> str:
    return yaml.safe_dump({"references": [e.to_dict() for e in entries]}, sort_keys=False)


def with_entry(entries: list[ReferenceEntry], entry: ReferenceEntry, *, replace: bool = False) -> list[ReferenceEntry]:
    """``entries`` with ``entry`` appended, or put in place of the entry with its id if ``replace``.

    The result is re-parsed from its YAML, so a manifest this returns is one the sensors accept.
    """
    validate_id(entry.id, "reference id")
    ids = [e.id for e in entries]
    if entry.id in ids and not replace:
        raise DuplicateReferenceError(
            f"reference id {entry.id!r} is already in the manifest (uri {entries[ids.index(entry.id)].uri}); "
            "pass --replace to update it"
        )
    out = [entry if e.id == entry.id else e for e in entries] if entry.id in ids else [*entries, entry]
    return parse_manifest(dump_manifest(out), source="updated manifest")


def merged_target_proportions(entries: list[ReferenceEntry]) -> dict[str, float]:
    """Per-reference target proportions combined; the same class with two values is an error."""
    merged: dict[str, float] = {}
    for e in entries:
        for cls, value in e.target_proportions.items():
            if cls in merged and merged[cls] != value:
                raise ManifestError(
                    f"target proportion for class {cls!r} is {merged[cls]} in one reference and {value} in {e.id!r}"
                )
            merged[cls] = value
    return merged
