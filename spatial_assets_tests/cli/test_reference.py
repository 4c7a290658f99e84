"""`spatial-assets reference add` against the deployment's storage: real SeaweedFS S3 and local files."""

from pathlib import Path

import pytest

from spatial_assets.cli import main
from spatial_assets.platform.manifest import MANIFEST_KEY, parse_manifest
from spatial_assets.storage.stores import LocalStore, S3Store

DATA = Path(__file__).resolve().parents[2] / "data"
REF = DATA / "mouse_POA_scRNA_ref_Moffitt2018.h5ad"


@pytest.fixture()
def s3_deployment(s3_env, s3_bucket, tmp_path, monkeypatch) -> S3Store:
    monkeypatch.setenv("SPATIAL_ASSETS_DEPLOYMENT", "s3")
    monkeypatch.setenv("SPATIAL_ASSETS_BUCKET", s3_bucket)
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    store = S3Store(s3_bucket, "", s3_env, cache_dir=tmp_path / "cache")
    store.put_file(REF, "raw/poa.h5ad")
    return store


def _add(*args: str) -> int:
    return main(["reference", "add", *args])


def test_reference_add_writes_a_manifest_the_sensor_reads(s3_deployment, capsys):
    store = s3_deployment
    uri = store.uri("raw/poa.h5ad")
    code = _add("--id", "poa", "--uri", uri, "--label-column", "cell_type",
                "--placeholder-label", "Ambiguous", "--placeholder-label", "Unstable", "--organism", "mouse")
    assert code == 0
    out = capsys.readouterr().out
    assert "added reference 'poa'" in out and "1308 cells × 134 genes" in out and "14 labels" in out
    (entry,) = parse_manifest(store.read_bytes(MANIFEST_KEY))
    assert (entry.id, entry.uri, entry.label_column, entry.organism) == ("poa", uri, "cell_type", "mouse")
    assert entry.placeholder_labels == ["Ambiguous", "Unstable"]
    # a second reference is appended, the first kept
    store.put_file(REF, "raw/poa_copy.h5ad")
    assert _add("--id", "poa_copy", "--uri", store.uri("raw/poa_copy.h5ad"), "--label-column", "cell_type") == 0
    assert [e.id for e in parse_manifest(store.read_bytes(MANIFEST_KEY))] == ["poa", "poa_copy"]


def test_duplicate_id_is_refused_unless_replace(s3_deployment, capsys):
    store = s3_deployment
    uri = store.uri("raw/poa.h5ad")
    assert _add("--id", "poa", "--uri", uri, "--label-column", "cell_type") == 0
    before = store.read_bytes(MANIFEST_KEY)
    capsys.readouterr()
    assert _add("--id", "poa", "--uri", uri, "--label-column", "cell_type_major") == 2
    err = capsys.readouterr().err
    assert "'poa' is already in the manifest" in err and "--replace" in err
    assert store.read_bytes(MANIFEST_KEY) == before
    assert _add("--id", "poa", "--uri", uri, "--label-column", "cell_type", "--organism", "mouse", "--replace") == 0
    assert "replaced reference 'poa'" in capsys.readouterr().out
    (entry,) = parse_manifest(store.read_bytes(MANIFEST_KEY))
    assert entry.organism == "mouse"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--id", "../poa", "--uri", "URI", "--label-column", "cell_type"], "invalid reference id '../poa'"),
        (["--id", "poa", "--uri", "URI", "--label-column", "no_such_column"], "label column 'no_such_column' not found"),
        (["--id", "poa", "--uri", "MISSING", "--label-column", "cell_type"], "cannot read it as an .h5ad reference"),
        (["--id", "poa", "--uri", "NOT_H5AD", "--label-column", "cell_type"], "cannot read it as an .h5ad reference"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(s3_deployment, capsys, args, message):
    store = s3_deployment
    store.write_bytes("raw/not.h5ad", b"this is not an h5ad file")
    uris = {"URI": store.uri("raw/poa.h5ad"), "MISSING": store.uri("raw/missing.h5ad"), "NOT_H5AD": store.uri("raw/not.h5ad")}
    args = [uris.get(a, a) for a in args]
    assert _add(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not store.exists(MANIFEST_KEY)


def test_reference_add_on_local_storage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPATIAL_ASSETS_DEPLOYMENT", "local")
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(tmp_path / "home"))
    assert _add("--id", "poa", "--uri", str(REF), "--label-column", "cell_type") == 0
    store = LocalStore(tmp_path / "home" / "storage")
    (entry,) = parse_manifest(store.read_bytes(MANIFEST_KEY))
    assert entry.uri == str(REF)
    # the local store writes through a temp file + rename: no stray temp files next to the manifest
    assert sorted(p.name for p in (tmp_path / "home" / "storage" / "manifests").iterdir()) == ["references.yaml"]
