"""What is registered where: reference entries from the manifest, samples from the landing prefix.

Shared by the Dagster sensors, the schedule, the assets and the demo, and free of Dagster so the
logic is testable on its own. Fingerprints use only HEAD/list calls (no downloads), so a sensor
tick stays fast however large the files are.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Sequence

import numpy as np

from spatial_assets.core.ids import InvalidIdError, validate_id
from spatial_assets.platform.manifest import (
    MANIFEST_KEY,
    ManifestError,
    ParsedManifest,
    ReferenceEntry,
    dump_manifest,
    parse_manifest,
    parse_manifest_entries,
    with_entry,
)
from spatial_assets.storage.locations import check_allowed_uri
from spatial_assets.storage.objectstore import S3Settings, fetch_to_cache, head, sha256_file

log = logging.getLogger(__name__)

H5AD = ".h5ad"
#: where samples land in the storage root (the default of ``PlatformSettings.landing_prefix``)
LANDING_PREFIX = "landing/samples/"


class SampleUnreadableError(ValueError):
    """``sample land`` for a path that cannot be read as an h5ad."""


class DuplicateSampleError(ValueError):
    """``sample land`` for an id that has already landed (without ``replace``)."""


class ReferenceUnreadableError(ValueError):
    """``reference add`` for a URI that cannot be read as an h5ad (missing, forbidden, not h5ad)."""


class ConcurrentEditError(ValueError):
    """The manifest changed between reading it and writing the new version (nothing was written)."""


def read_manifest(store: Any, manifest_key: str) -> list[ReferenceEntry]:
    """Every entry, strictly (any bad entry raises): for writers of the manifest."""
    if not store.exists(manifest_key):
        return []
    return parse_manifest(store.read_bytes(manifest_key), source=store.uri(manifest_key))


def read_manifest_entries(store: Any, manifest_key: str) -> ParsedManifest:
    """The valid entries and one problem per bad one: for readers that must keep the rest going.

    A manifest that does not exist is not ``complete`` (it says nothing about which ids are gone).
    """
    if not store.exists(manifest_key):
        return ParsedManifest(complete=False)
    return parse_manifest_entries(store.read_bytes(manifest_key), source=store.uri(manifest_key))


def find_entry(store: Any, manifest_key: str, reference_id: str) -> ReferenceEntry:
    """The valid entry ``reference_id``; its own problem if it is a bad entry (other bad entries do not matter)."""
    parsed = read_manifest_entries(store, manifest_key)
    for e in parsed.entries:
        if e.id == reference_id:
            return e
    own = [p for p in parsed.problems if f"(id {reference_id!r})" in p or f"reference id {reference_id!r}" in p]
    if own or (parsed.problems and reference_id not in parsed.mentioned_ids and not parsed.complete):
        raise ManifestError(f"reference {reference_id!r} cannot be used: " + "; ".join(own or parsed.problems))
    raise ManifestError(
        f"reference {reference_id!r} is not in {store.uri(manifest_key)} (listed: {[e.id for e in parsed.entries]})"
    )


def entry_fingerprint(entry: ReferenceEntry, s3_settings: S3Settings | None = None, allowed: Sequence[str] | None = None) -> str:
    """Changes when the file (ETag / size+mtime) or any field of the entry changes.

    ``allowed``: the locations the entry may point at (refused with a clear error otherwise).
    """
    if allowed is not None:
        check_allowed_uri(entry.uri, allowed)
    info = head(entry.uri, settings=s3_settings)
    payload = json.dumps({"entry": entry.to_dict(), "etag": info["etag"], "size": info["size"]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def describe_reference(
    entry: ReferenceEntry, s3_settings: S3Settings | None = None, *, allowed: Sequence[str] | None = None, n_sample_rows: int = 5000
) -> dict[str, Any]:
    """Validate a reference file and return its record (hashes, shape, labels, normalization).

    ``allowed``: the locations the entry may point at; anything else is refused before it is read.
    """
    if allowed is not None:
        check_allowed_uri(entry.uri, allowed)
    import anndata as ad

    from spatial_assets.core.normalization import detect_normalization
    from spatial_assets.celltyping.references import ReferenceError, check_reference_obs

    info = head(entry.uri, settings=s3_settings)
    local = fetch_to_cache(entry.uri, settings=s3_settings)
    backed = ad.read_h5ad(local, backed="r")
    try:
        check_reference_obs(entry.uri, backed.obs.columns, backed.obs_names, entry.label_column)
        rng = np.random.default_rng(0)
        n = backed.n_obs
        rows = np.sort(rng.choice(n, size=min(n, n_sample_rows), replace=False))
        sample = backed[rows].to_memory()
        status = detect_normalization(sample)
        labels = backed.obs[entry.label_column].astype(str).value_counts()
        record = {
            "id": entry.id,
            "uri": entry.uri,
            "label_column": entry.label_column,
            "organism": entry.organism,
            "target_proportions": dict(entry.target_proportions),
            "placeholder_labels": list(entry.placeholder_labels),
            "sha256": sha256_file(local),
            "etag": info["etag"],
            "size": info["size"],
            "n_obs": int(backed.n_obs),
            "n_vars": int(backed.n_vars),
            "label_counts": {str(k): int(v) for k, v in labels.items()},
            "normalization": status.to_dict(),
        }
    finally:
        backed.file.close()
    if not status.is_usable:
        raise ReferenceError(
            f"{entry.uri}: expression is {status.x_state!r} and no raw counts were found; "
            "provide raw counts (layers['counts'] or raw.X) or log1p(10k)-normalized data"
        )
    return record


@dataclass(frozen=True)
class LandedSample:
    sample_id: str
    keys: tuple[str, ...]
    fingerprint: str

    @property
    def h5ad_key(self) -> str:
        h5ads = [k for k in self.keys if k.endswith(H5AD)]
        if len(h5ads) != 1:
            raise ValueError(f"sample {self.sample_id!r}: expected exactly one .h5ad in the landing area, found {h5ads}")
        return h5ads[0]


def scan_landing(store: Any, prefix: str, *, sample_id: str | None = None) -> tuple[list[LandedSample], list[str]]:
    """Group landing objects by sample: ``<prefix><id>.h5ad`` or ``<prefix><id>/...``.

    Returns the samples and a list of problems (invalid ids) to log, not to crash on: one bad
    upload must not stop other samples from being registered. ``sample_id`` lists only the keys
    that can belong to that sample (one sample's run need not list the whole landing area).
    """
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    groups: dict[str, list[Any]] = {}
    problems: list[str] = []
    for obj in store.list(prefix + (sample_id or "")):
        rel = obj.key[len(prefix) :]
        if not rel or rel.endswith("/"):
            continue
        parts = PurePosixPath(rel).parts
        sid = parts[0][: -len(H5AD)] if len(parts) == 1 and parts[0].endswith(H5AD) else parts[0]
        if len(parts) == 1 and not parts[0].endswith(H5AD):
            continue
        groups.setdefault(sid, []).append(obj)
    samples = []
    for sid, objs in sorted(groups.items()):
        if sample_id is not None and sid != sample_id:
            continue
        try:
            validate_id(sid, "sample id")
        except InvalidIdError as exc:
            problems.append(str(exc))
            continue
        objs = sorted(objs, key=lambda o: o.key)
        fp = hashlib.sha256("|".join(f"{o.key}:{o.etag}:{o.size}" for o in objs).encode()).hexdigest()[:20]
        samples.append(LandedSample(sid, tuple(o.key for o in objs), fp))
    return samples, problems



def prefix_uri(store: Any, prefix: str) -> str:
    """The URI of a key prefix (``s3://bucket/landing/samples/``), for messages."""
    stripped = prefix.strip("/")
    return (store.uri(stripped) + "/") if stripped else store.uri("")


def landing_key(prefix: str, sample_id: str) -> str:
    """``<prefix><id>.h5ad``: the key ``sample land`` writes (the id validated first)."""
    validate_id(sample_id, "sample id")
    return f"{prefix.rstrip('/')}/{sample_id}{H5AD}"


def register_reference(
    store: Any,
    entry: ReferenceEntry,
    *,
    manifest_key: str = MANIFEST_KEY,
    replace: bool = False,
    s3_settings: S3Settings | None = None,
) -> dict[str, Any]:
    """Add ``entry`` to the manifest in ``store`` after checking its file is a usable reference.

    Order matters for "nothing wrong written": the id and the duplicate rule are checked first
    (cheap), then the file is read with its label column and normalization checked (the same
    validation ``reference_atlas`` runs), and only then is the new manifest written, in one PUT /
    rename. If the manifest changed meanwhile (another writer), nothing is written.
    """
    before = store.info(manifest_key).etag if store.exists(manifest_key) else None
    entries = read_manifest(store, manifest_key)
    updated = with_entry(entries, entry, replace=replace)  # id + duplicate check before any download
    try:
        record = describe_reference(entry, s3_settings=s3_settings)
    except ValueError:
        raise  # already names the file and the problem (label column, normalization, ids)
    except Exception as exc:  # missing object / no access / not an h5ad: h5py, botocore, OS errors
        raise ReferenceUnreadableError(f"{entry.uri}: cannot read it as an .h5ad reference ({type(exc).__name__}: {exc})") from exc
    now = store.info(manifest_key).etag if store.exists(manifest_key) else None
    if now != before:
        raise ConcurrentEditError(f"{store.uri(manifest_key)} changed while {entry.id!r} was being validated; run again")
    store.write_bytes(manifest_key, dump_manifest(updated).encode())
    return {
        "id": entry.id,
        "uri": entry.uri,
        "manifest": store.uri(manifest_key),
        "replaced": entry.id in {e.id for e in entries},
        "sha256": record["sha256"],
        "n_cells": record["n_obs"],
        "n_genes": record["n_vars"],
        "n_labels": len(record["label_counts"]),
        "normalization": record["normalization"]["x_state"],
    }


def land_sample(
    store: Any,
    sample_id: str,
    path: str,
    *,
    landing_prefix: str = LANDING_PREFIX,
    replace: bool = False,
    s3_settings: S3Settings | None = None,
) -> dict[str, Any]:
    """Validate a cell-level h5ad as ``spatial_cells`` will, then upload it under the landing prefix.

    The file is read and checked (cell ids unique, finite coordinates, unique gene names, a
    non-empty panel) before anything is written; the upload itself is atomic (the object appears
    only once complete). An id that has already landed is refused unless ``replace``.
    """
    import anndata as ad

    from spatial_assets.core.spatial import prepare_spatial_cells
    from spatial_assets.platform.panels import sample_panel

    key = landing_key(landing_prefix, sample_id)
    existing = scan_landing(store, landing_prefix, sample_id=sample_id)[0]
    if existing and not replace:
        raise DuplicateSampleError(
            f"sample id {sample_id!r} has already landed ({', '.join(store.uri(k) for k in existing[0].keys)}); "
            "pass --replace to overwrite it"
        )
    try:
        local = fetch_to_cache(path, settings=s3_settings)
        adata = ad.read_h5ad(local)
    except Exception as exc:  # missing file / S3 error / not an h5ad: h5py, botocore and OS errors alike
        raise SampleUnreadableError(f"{path}: cannot read it as an .h5ad sample ({type(exc).__name__}: {exc})") from exc
    prepared = prepare_spatial_cells(adata, sample_id=sample_id, source=str(path))
    panel = sample_panel(prepared, sample_id=sample_id)
    store.put_file(local, key)
    stale = [k for s in existing for k in s.keys if k != key]
    for old in stale:  # a folder-form sample replaced by one file: the landing area keeps one h5ad per id
        store.delete(old)
    return {
        "sample_id": sample_id,
        "uri": store.uri(key),
        "replaced": bool(existing),
        "n_cells": int(prepared.n_obs),
        "n_genes": int(prepared.n_vars),
        "panel_id": panel.id,
        "panel_name": panel.name,
    }
