"""Unreadable inputs and unexpected errors: exit code, ONE line naming the file, no traceback, nothing written.

Local files are real broken files; S3 cases run against the real SeaweedFS of the session (404,
wrong secret -> 403, no credentials at all).
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import pytest

from spatial_assets.cli import main
from spatial_assets.cli.common import DEBUG_HINT
from spatial_assets.storage.objectstore import S3Settings, upload_file

PROGRESS_LINE = re.compile(r"^\[\s*\d+\.\d+s\] ")


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not PROGRESS_LINE.match(line)]


def _celltype(reference: str, spatial: str, out: str, *extra: str) -> list[str]:
    return ["celltype", "--reference", reference, "--label-column", "cell_type", "--spatial", spatial, "--out", out, *extra]


def _broken_files(tmp: Path, source: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the reason the error must give)."""
    data = source.read_bytes()
    truncated = tmp / "truncated.h5ad"
    truncated.write_bytes(data[:20_000])
    text = tmp / "table.h5ad"
    text.write_text("cell,gene\n1,2\n")
    empty = tmp / "empty.h5ad"
    empty.write_bytes(b"")
    plain_hdf5 = tmp / "plain.h5ad"
    with h5py.File(plain_hdf5, "w") as fh:
        fh["values"] = [1, 2, 3]
    return {
        "missing": (tmp / "nope.h5ad", "no such file"),
        "truncated": (truncated, f"truncated HDF5/h5ad file (20,000 of {len(data):,} bytes)"),
        "not hdf5": (text, "not an HDF5/h5ad file (truncated?)"),
        "empty": (empty, "empty file (0 bytes)"),
        "hdf5, not anndata": (plain_hdf5, "an HDF5 file but not an AnnData h5ad (no obs or var group)"),
        "directory": (tmp, "is a directory, not a file"),
    }


@pytest.mark.parametrize("role", ["spatial sample", "reference"])
def test_unreadable_local_inputs_exit_2_with_one_line(tmp_path, capsys, poa_reference_path, merfish_path, role):
    broken_dir = tmp_path / "in"
    broken_dir.mkdir()
    out_dir = tmp_path / "out"
    for name, (path, reason) in _broken_files(broken_dir, poa_reference_path).items():
        if role == "reference":
            argv = _celltype(str(path), str(merfish_path), str(out_dir / "a.h5ad"))
        else:
            argv = _celltype(str(poa_reference_path), str(path), str(out_dir / "a.h5ad"))
        assert main(argv) == 2, name
        captured = capsys.readouterr()
        err = _errors(captured.err)
        assert err == [f"error: cannot read {role} {path}: {reason}"], (name, err)
        assert "Traceback" not in captured.err
        assert not out_dir.exists(), name


def test_domains_names_the_unreadable_input(tmp_path, capsys, starmap_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(starmap_path.read_bytes()[:5_000])
    out = tmp_path / "o.h5ad"
    assert main(["domains", "--spatial", str(starmap_path), "--spatial", str(bad), "--n-domains", "4", "--out", str(out)]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: cannot read spatial sample {bad}: truncated HDF5/h5ad file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad"]


def test_debug_prints_the_traceback(tmp_path, capsys, poa_reference_path):
    missing = tmp_path / "nope.h5ad"
    assert main(["--debug", *_celltype(str(poa_reference_path), str(missing), str(tmp_path / "o.h5ad"))]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err
    assert err.rstrip().splitlines()[-1] == f"error: cannot read spatial sample {missing}: no such file"
    # also accepted after the subcommand
    assert main([*_celltype(str(poa_reference_path), str(missing), str(tmp_path / "o.h5ad")), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unexpected_error_exits_1_with_a_hint(tmp_path, capsys, monkeypatch, poa_reference_path, merfish_path):
    """A bug (not bad input) is exit 1 and one line pointing at --debug; the fault is injected on purpose."""
    import spatial_assets.celltyping.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("internal invariant broken\nsecond line")

    monkeypatch.setattr(pipeline, "run_celltyping", broken)
    out = tmp_path / "o.h5ad"
    assert main(_celltype(str(poa_reference_path), str(merfish_path), str(out))) == 1
    captured = capsys.readouterr()
    assert _errors(captured.err) == [f"error: unexpected RuntimeError: internal invariant broken ({DEBUG_HINT})"]
    assert "Traceback" not in captured.err and not out.exists()
    assert main(["--debug", *_celltype(str(poa_reference_path), str(merfish_path), str(out))]) == 1
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ S3


@pytest.fixture()
def s3_inputs(s3_env: S3Settings, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poa_reference_path):
    """The POA reference in a fresh bucket; the CLI's download cache in tmp_path."""
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    ref = f"s3://{s3_bucket}/refs/poa.h5ad"
    upload_file(poa_reference_path, ref, settings=s3_env)
    return ref


def test_s3_missing_object_is_404(s3_inputs, s3_bucket, tmp_path, capsys):
    missing = f"s3://{s3_bucket}/samples/missing.h5ad"
    assert main(_celltype(s3_inputs, missing, str(tmp_path / "o.h5ad"))) == 2
    captured = capsys.readouterr()
    assert _errors(captured.err) == [f"error: cannot read spatial sample {missing}: no such object (S3 404)"]
    assert "Traceback" not in captured.err and not (tmp_path / "o.h5ad").exists()


def test_s3_wrong_secret_is_403(s3_inputs, s3_bucket, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert main(_celltype(s3_inputs, s3_inputs, str(tmp_path / "o.h5ad"))) == 2
    captured = capsys.readouterr()
    err = _errors(captured.err)
    assert len(err) == 1 and err[0].startswith(f"error: cannot read reference {s3_inputs}: access denied (S3 ")
    assert "AWS_SECRET_ACCESS_KEY" in err[0] and "Traceback" not in captured.err


def test_s3_without_credentials(s3_inputs, tmp_path, capsys, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    # nothing else in boto3's chain: no shared files, no instance metadata
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main(_celltype(s3_inputs, s3_inputs, str(tmp_path / "o.h5ad"))) == 2
    captured = capsys.readouterr()
    assert _errors(captured.err) == [
        f"error: cannot read reference {s3_inputs}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    ]
    assert "Traceback" not in captured.err
