"""``segment`` with a raw folder landed in a real S3 (SeaweedFS) and outputs written back to it."""

from __future__ import annotations

import pytest

from spatial_assets.cli import main
from spatial_assets.storage.objectstore import S3Settings, fetch_to_cache, upload_file

from .conftest import COSMX

pytestmark = pytest.mark.s3


def test_segment_from_and_to_s3(s3_env: S3Settings, s3_bucket, tmp_path, capsys):
    for p in COSMX.rglob("*"):
        if p.is_file():
            upload_file(p, f"s3://{s3_bucket}/landing/cosmx_lung_mini/{p.relative_to(COSMX)}", settings=s3_env)
    out = f"s3://{s3_bucket}/segmented/lung.h5ad"
    assert main(["segment", "--input", f"s3://{s3_bucket}/landing/cosmx_lung_mini", "--method", "vendor", "--out", out]) == 0
    assert "67 cells" in capsys.readouterr().out
    client = s3_env.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="segmented/")["Contents"])
    assert keys == ["segmented/lung.boundaries.parquet", "segmented/lung.h5ad", "segmented/lung.transcripts.parquet"]
    import anndata as ad

    assert ad.read_h5ad(fetch_to_cache(out, cache_dir=tmp_path / "c", settings=s3_env)).n_obs == 67
    # a prefix with nothing under it is bad input and writes nothing
    assert main(["segment", "--input", f"s3://{s3_bucket}/landing/none", "--out", f"s3://{s3_bucket}/x/y.h5ad"]) == 2
    assert "no objects under this prefix" in capsys.readouterr().err
    assert "Contents" not in client.list_objects_v2(Bucket=s3_bucket, Prefix="x/")
