"""Allowed reference locations: a manifest may only point the workers at configured buckets/prefixes/directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from spatial_assets.platform.manifest import ReferenceEntry
from spatial_assets.platform.registry import describe_reference, entry_fingerprint
from spatial_assets.storage.locations import LocationNotAllowedError, check_allowed_uri, normalize_location

DATA = Path(__file__).resolve().parents[2] / "data"


def test_s3_prefixes_are_whole_segments() -> None:
    allowed = ["s3://deploy/pfx", "s3://shared-refs/"]
    assert check_allowed_uri("s3://deploy/pfx/raw/r.h5ad", allowed) == "s3://deploy/pfx/raw/r.h5ad"
    assert check_allowed_uri("s3://shared-refs/any/where.h5ad", allowed)
    for uri in ("s3://deploy/pfx2/r.h5ad", "s3://deploy/r.h5ad", "s3://other-bucket/pfx/r.h5ad", "s3://deploy-x/pfx/r.h5ad"):
        with pytest.raises(LocationNotAllowedError) as exc:
            check_allowed_uri(uri, allowed)
        assert uri in str(exc.value) and "s3://deploy/pfx/" in str(exc.value) and "SPATIAL_ASSETS_ALLOWED_LOCATIONS" in str(exc.value)


def test_local_paths_are_resolved_before_the_check(tmp_path: Path) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "r.h5ad").write_bytes(b"x")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "key.pem").write_bytes(b"secret")
    (refs / "sneaky.h5ad").symlink_to(tmp_path / "private" / "key.pem")
    allowed = [str(refs)]
    assert check_allowed_uri(str(refs / "r.h5ad"), allowed) == str((refs / "r.h5ad").resolve())
    with pytest.raises(LocationNotAllowedError, match=r"sneaky.h5ad.*resolves to .*private/key.pem"):
        check_allowed_uri(str(refs / "sneaky.h5ad"), allowed)  # a link inside the allowed dir pointing out
    with pytest.raises(LocationNotAllowedError, match=r"\.\./private"):
        check_allowed_uri(f"{refs}/../private/key.pem", allowed)
    with pytest.raises(LocationNotAllowedError, match="/etc/passwd"):
        check_allowed_uri("/etc/passwd", allowed)
    with pytest.raises(LocationNotAllowedError, match="relative"):
        check_allowed_uri("refs/r.h5ad", allowed)
    with pytest.raises(LocationNotAllowedError, match="scheme 'https'"):
        check_allowed_uri("https://example.org/r.h5ad", allowed + ["s3://b/"])
    with pytest.raises(LocationNotAllowedError, match=r"\(none\)"):
        check_allowed_uri(str(refs / "r.h5ad"), [])


def test_allowed_locations_are_validated() -> None:
    assert normalize_location("s3://b") == "s3://b/" and normalize_location("s3://b/p/q/") == "s3://b/p/q/"
    for bad, why in (("s3://", "no bucket"), ("gs://b/p", "scheme 'gs'"), ("rel/dir", "absolute")):
        with pytest.raises(ValueError, match=why):
            normalize_location(bad)


def test_a_manifest_uri_outside_the_allow_list_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """What the reference asset and the manifest sensor call: the entry never reaches a download."""
    reference = DATA / "mouse_POA_scRNA_ref_Moffitt2018.h5ad"
    allowed = [str(tmp_path / "refs")]
    entry = ReferenceEntry(id="poa", uri=str(reference), label_column="cell_type")
    for call in (lambda: describe_reference(entry, allowed=allowed), lambda: entry_fingerprint(entry, allowed=allowed)):
        with pytest.raises(LocationNotAllowedError) as exc:
            call()
        assert str(reference) in str(exc.value) and str(tmp_path / "refs") in str(exc.value)
    record = describe_reference(entry, allowed=[str(DATA)])  # allowed: read and described as before
    assert record["n_obs"] > 0 and len(entry_fingerprint(entry, allowed=[str(DATA)])) == 20
