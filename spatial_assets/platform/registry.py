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
from spatial_assets.platform.manifest import ManifestError, ReferenceEntry, parse_manifest
from spatial_assets.storage.locations import check_allowed_uri
from spatial_assets.storage.objectstore import S3Settings, fetch_to_cache, head, sha256_file

log = logging.getLogger(__name__)

H5AD = ".h5ad"


def read_manifest(store: Any, manifest_key: str) -> list[ReferenceEntry]:
    if not store.exists(manifest_key):
        return []
    return parse_manifest(store.read_bytes(manifest_key), source=store.uri(manifest_key))


def find_entry(store: Any, manifest_key: str, reference_id: str) -> ReferenceEntry:
    entries = read_manifest(store, manifest_key)
    for e in entries:
        if e.id == reference_id:
            return e
    raise ManifestError(
        f"reference {reference_id!r} is not in {store.uri(manifest_key)} (listed: {[e.id for e in entries]})"
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

