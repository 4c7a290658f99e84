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

import re
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


#: URI schemes a reference may use (anything else is named in the error); a path without a scheme is local
SUPPORTED_SCHEMES = ("s3",)
_FIELDS = {"id", "uri", "label_column", "organism", "target_proportions", "placeholder_labels"}
_ID_LINE = re.compile(r"^[\s-]*id\s*:\s*['\"]?([^'\"\s#,}]+)", re.MULTILINE)


@dataclass
class ParsedManifest:
    """What a manifest says, entry by entry: the valid entries and one problem per bad entry.

    ``mentioned_ids``: every id the manifest names, valid or not (a bad entry still claims its
    id: its partition is kept, not removed). ``complete``: False when part of the document could
    not be read at all, so the manifest cannot say which ids are gone (nothing may be removed on
    its word).
    """

    entries: list[ReferenceEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    mentioned_ids: set[str] = field(default_factory=set)
    complete: bool = True


def parse_manifest(text: str | bytes, source: str = "references manifest") -> list[ReferenceEntry]:
    """Parse and validate the YAML text strictly: any problem raises, naming every bad entry.

    For writers (``reference add``): a manifest is only rewritten when it is entirely valid, so
    a bad entry is never silently dropped. Readers that must keep going (sensors, assets) use
    :func:`parse_manifest_entries`.
    """
    parsed = parse_manifest_entries(text, source)
    if parsed.problems:
        raise ManifestError("; ".join(parsed.problems))
    return parsed.entries


def parse_manifest_entries(text: str | bytes, source: str = "references manifest") -> ParsedManifest:
    """Parse entry by entry: each problem names its entry (index, id) and field; the rest are usable.

    Invalid YAML in one entry does not hide the others: when the document does not parse, the
    ``references`` list is split into its items and each is parsed on its own. Duplicate ids
    exclude every entry with that id (which one is meant is ambiguous).
    """
    out = ParsedManifest()
    raw_text = text.decode(errors="replace") if isinstance(text, bytes) else text
    try:
        doc = yaml.safe_load(raw_text) or {}
    except yaml.YAMLError as exc:
        items = _split_items(raw_text)
        if items is None:
            out.problems.append(f"{source}: not valid YAML: {_short(exc)}")
            out.complete = False
            return out
    else:
        if not isinstance(doc, dict) or not isinstance(doc.get("references", []), list):
            out.problems.append(f"{source}: expected a mapping with a 'references' list")
            out.complete = False
            return out
        items = [(raw, None) for raw in (doc.get("references") or [])]
    candidates: list[tuple[int, ReferenceEntry]] = []
    for i, (raw, chunk) in enumerate(items):
        where = f"{source}: references[{i}]"
        if chunk is not None:  # split from a document that did not parse: parse this item alone
            try:
                parsed = yaml.safe_load(chunk)
            except yaml.YAMLError as exc:
                rid = _ID_LINE.search(chunk)
                if rid:
                    out.mentioned_ids.add(rid.group(1))
                    where += f" (id {rid.group(1)!r})"
                else:
                    out.complete = False
                out.problems.append(f"{where}: not valid YAML: {_short(exc)}")
                continue
            raw = parsed[0] if isinstance(parsed, list) and len(parsed) == 1 else parsed
        if isinstance(raw, dict) and isinstance(raw.get("id"), str) and raw["id"].strip():
            out.mentioned_ids.add(raw["id"].strip())
            where += f" (id {raw['id'].strip()!r})"
        elif isinstance(raw, dict):
            out.complete = False  # an entry without a usable id: it may be one whose partition exists
        try:
            candidates.append((i, _entry(raw, where)))
        except ManifestError as exc:
            out.problems.append(str(exc))
    positions: dict[str, list[int]] = {}
    for i, entry in candidates:
        positions.setdefault(entry.id, []).append(i)
    for i, entry in candidates:
        where = positions[entry.id]
        if len(where) > 1:
            if i == where[0]:
                listed = ", ".join(f"references[{j}]" for j in where)
                out.problems.append(
                    f"{source}: duplicate reference id {entry.id!r} ({listed}): none of them is used until one is removed"
                )
            continue
        out.entries.append(entry)
    return out


def _entry(raw: Any, where: str) -> ReferenceEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {sorted(unknown)}")
    for key in ("id", "uri", "label_column"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ManifestError(f"{where}: missing or empty '{key}'")
    try:
        rid = validate_id(raw["id"], "reference id")
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from exc
    uri = raw["uri"].strip()
    scheme = uri.split("://", 1)[0] if "://" in uri else None
    if scheme is not None and scheme.lower() not in SUPPORTED_SCHEMES:
        raise ManifestError(
            f"{where}: unknown URI scheme {scheme!r} in {uri!r} (supported: "
            + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES) + ", or a local path)"
        )
    props = raw.get("target_proportions") or {}
    if not isinstance(props, dict) or not all(isinstance(v, (int, float)) for v in props.values()):
        raise ManifestError(f"{where}: target_proportions must map class name -> number")
    placeholders = raw.get("placeholder_labels") or []
    if not isinstance(placeholders, list) or not all(isinstance(v, str) for v in placeholders):
        raise ManifestError(f"{where}: placeholder_labels must be a list of strings")
    return ReferenceEntry(
        id=rid,
        uri=uri,
        label_column=raw["label_column"],
        organism=raw.get("organism"),
        target_proportions={str(k): float(v) for k, v in props.items()},
        placeholder_labels=list(placeholders),
    )


def _split_items(text: str) -> list[tuple[None, str]] | None:
    """The items of the top-level ``references:`` block list, each as its own YAML text (or None)."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if re.match(r"^references\s*:\s*(#.*)?$", line))
    except StopIteration:
        return None
    body = lines[start + 1 :]
    marks = [(i, len(line) - len(line.lstrip())) for i, line in enumerate(body) if line.lstrip().startswith("- ") or line.strip() == "-"]
    if not marks:
        return None
    indent = min(ind for _, ind in marks)
    starts = [i for i, ind in marks if ind == indent]
    if any(line.strip() and not line.startswith(" " * indent) for line in body[starts[0]:]) or any(
        line.strip() and not line.lstrip().startswith("#") for line in body[: starts[0]]
    ):
        return None  # something else at the top level: not a plain list we can split
    chunks = []
    for a, b in zip(starts, [*starts[1:], len(body)]):
        chunks.append((None, "\n".join(line[indent:] for line in body[a:b])))
    return chunks


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())


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
