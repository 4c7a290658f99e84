"""What is registered where: reference entries from the manifest, samples from the landing prefix.

Shared by the Dagster sensors, the schedule, the assets and the demo, and free of Dagster so the
logic is testable on its own. Fingerprints use only HEAD/list calls (no downloads), so a sensor
tick stays fast however large the files are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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


#: the kinds of landed sample: a cell-level h5ad, or an instrument output folder to segment
CELLS, RAW = "cells", "raw"


@dataclass(frozen=True)
class LandedSample:
    """One sample in the landing area, as a listing shows it (nothing downloaded).

    ``kind`` is ``"raw"`` for a ``<id>/`` folder whose file names mark an instrument's output (the
    rules of :func:`spatial_assets.segmentation.platforms.detect_platform_from_keys`), or a folder
    holding neither such files nor an ``.h5ad`` (the raw-sample run then fails with the readers'
    error naming what each platform needs); ``"cells"`` for ``<id>.h5ad`` or a folder with an h5ad.
    """

    sample_id: str
    keys: tuple[str, ...]
    fingerprint: str
    kind: str = CELLS
    platform: str | None = None  # raw: the platform the file names mark (None: none or several)
    folder: str | None = None  # the ``<prefix><id>/`` key prefix of a folder-form sample
    etags: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()

    @property
    def h5ad_key(self) -> str:
        h5ads = [k for k in self.keys if k.endswith(H5AD)]
        if len(h5ads) != 1:
            raise ValueError(f"sample {self.sample_id!r}: expected exactly one .h5ad in the landing area, found {h5ads}")
        return h5ads[0]

    @property
    def raw_files(self) -> list[tuple[str, str, str, int]]:
        """``(path relative to the folder, key, etag, size)`` of every file of a folder-form sample."""
        if self.folder is None:
            return []
        rows = zip(self.keys, self.etags or ("",) * len(self.keys), self.sizes or (0,) * len(self.keys))
        return [(k[len(self.folder):], k, e, int(n)) for k, e, n in rows if k.startswith(self.folder)]


def classify_landing(keys: Sequence[str], folder: str | None) -> tuple[str, str | None]:
    """``(kind, platform)`` of a landed sample from its keys: see :class:`LandedSample`."""
    from spatial_assets.segmentation.errors import SegmentationInputError
    from spatial_assets.segmentation.platforms import detect_platform_from_keys

    rels = [k[len(folder):] for k in keys if folder and k.startswith(folder)]
    if rels:
        try:
            return RAW, detect_platform_from_keys(rels, where=folder or "")
        except SegmentationInputError:
            pass
    if any(k.endswith(H5AD) for k in keys):
        return CELLS, None
    return RAW, None


def scan_landing(store: Any, prefix: str, *, sample_id: str | None = None) -> tuple[list[LandedSample], list[str]]:
    """Group landing objects by sample: ``<prefix><id>.h5ad`` or ``<prefix><id>/...``.

    Returns the samples and a list of problems (invalid ids) to log, not to crash on: one bad
    upload must not stop other samples from being registered. ``sample_id`` lists only the keys
    that can belong to that sample (one sample's run need not list the whole landing area).
    Each sample's kind (cell-level h5ad or raw instrument folder) comes from its file names.
    """
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    groups: dict[str, list[Any]] = {}
    folders: set[str] = set()
    problems: list[str] = []
    for obj in store.list(prefix + (sample_id or "")):
        rel = obj.key[len(prefix) :]
        if not rel or rel.endswith("/"):
            continue
        parts = PurePosixPath(rel).parts
        sid = parts[0][: -len(H5AD)] if len(parts) == 1 and parts[0].endswith(H5AD) else parts[0]
        if len(parts) == 1 and not parts[0].endswith(H5AD):
            continue
        if len(parts) > 1:
            folders.add(sid)
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
        folder = f"{prefix}{sid}/" if sid in folders else None
        keys = tuple(o.key for o in objs)
        kind, platform = classify_landing(keys, folder)
        samples.append(LandedSample(sid, keys, fp, kind=kind, platform=platform, folder=folder,
                                    etags=tuple(str(o.etag) for o in objs), sizes=tuple(int(o.size) for o in objs)))
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
    A directory (or an ``s3://`` prefix not ending in ``.h5ad``) is an instrument output folder:
    see :func:`land_raw_folder`.
    """
    if _is_folder(path):
        return land_raw_folder(store, sample_id, path, landing_prefix=landing_prefix, replace=replace)
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
        "kind": CELLS,
        "uri": store.uri(key),
        "replaced": bool(existing),
        "n_cells": int(prepared.n_obs),
        "n_genes": int(prepared.n_vars),
        "panel_id": panel.id,
        "panel_name": panel.name,
    }


def _is_folder(path: str) -> bool:
    from spatial_assets.storage.objectstore import is_s3_uri

    if is_s3_uri(path):
        return not str(path).endswith(H5AD)
    return Path(path).is_dir()


def raw_folder_key(prefix: str, sample_id: str) -> str:
    """``<prefix><id>/``: where ``sample land`` puts the files of a raw folder (the id validated first)."""
    validate_id(sample_id, "sample id")
    return f"{prefix.rstrip('/')}/{sample_id}/"


@contextlib.contextmanager
def named_in_storage(folder: Path, landing_uri: str) -> Iterator[None]:
    """Readers' errors name the file where the user put it (the landing area, an ``s3://`` source), not in
    the local staging directory it was read from."""
    from spatial_assets.segmentation.errors import SegmentationInputError

    try:
        yield
    except SegmentationInputError as exc:
        message = str(exc).replace(str(folder).rstrip("/") + "/", landing_uri).replace(str(folder), landing_uri.rstrip("/"))
        raise type(exc)(message) from exc


def land_raw_folder(
    store: Any,
    sample_id: str,
    path: str,
    *,
    landing_prefix: str = LANDING_PREFIX,
    replace: bool = False,
) -> dict[str, Any]:
    """Validate an instrument output folder as ``raw_sample`` will, then upload it to ``<prefix><id>/``.

    The platform is detected from the file names and the folder is read with that platform's reader
    (transcripts, image and transform, vendor cells), so a folder the platform would refuse (no known
    platform, a missing transform or image, an empty transcript table, an unreadable TIFF, ...) is
    refused here with the same message, before anything is written. Each file is uploaded atomically;
    files of an earlier landing of the id that the new folder does not have are deleted afterwards
    (``replace``). ``path``: a local directory or an ``s3://`` prefix (read with the environment's
    S3 credentials).
    """
    import tempfile

    from spatial_assets.segmentation.fingerprint import fetch_folder
    from spatial_assets.segmentation.platforms import detect_platform
    from spatial_assets.segmentation.readers import read_sample

    folder_key = raw_folder_key(landing_prefix, sample_id)
    existing = scan_landing(store, landing_prefix, sample_id=sample_id)[0]
    if existing and not replace:
        where = existing[0].folder or existing[0].keys[0]
        raise DuplicateSampleError(
            f"sample id {sample_id!r} has already landed ({store.uri(where.rstrip('/'))}); pass --replace to overwrite it"
        )
    with tempfile.TemporaryDirectory(prefix="land_raw_") as tmp:
        folder = fetch_folder(str(path), tmp)
        with named_in_storage(folder, str(path).rstrip("/") + "/"):
            platform = detect_platform(folder)
            sample = read_sample(folder, platform)  # the readers' checks; errors name the file at fault
        files = sorted(str(p.relative_to(folder)).replace("\\", "/") for p in folder.rglob("*") if p.is_file())
        new_keys = {folder_key + rel for rel in files}
        n_bytes = 0
        for rel in files:
            n_bytes += store.put_file(folder / rel, folder_key + rel).size
    for old in [k for s in existing for k in s.keys if k not in new_keys]:
        store.delete(old)  # an earlier landing's files the new folder does not have (or its h5ad)
    return {
        "sample_id": sample_id,
        "kind": RAW,
        "uri": store.uri(folder_key.rstrip("/")) + "/",
        "replaced": bool(existing),
        "platform": platform,
        "n_files": len(files),
        "n_bytes": int(n_bytes),
        "n_transcripts": int(len(sample.transcripts)),
        "n_genes": int(len(sample.genes)),
        "image": "none" if sample.image is None else "x".join(str(v) for v in sample.image.shape),
        "vendor_cells": sample.vendor is not None,
    }
