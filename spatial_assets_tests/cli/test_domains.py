"""``domains`` subcommand through main([...]), local files and a real S3 (SeaweedFS)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from spatial_assets.cli import main
from spatial_assets.cli.common import InputError
from spatial_assets.cli.domains import output_paths
from spatial_assets.domains.synthetic import make_synthetic_tissue, split_samples
from spatial_assets.storage.objectstore import S3Settings, fetch_to_cache, upload_file


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("in")
    paths = []
    for s in split_samples(make_synthetic_tissue(4000, n_domains=4, composition_concentration=0.5, seed=5)):
        p = d / f"{s.obs['sample_id'].iloc[0]}.h5ad"
        s.write_h5ad(p)
        paths.append(p)
    return paths


def test_two_inputs_two_suffixed_outputs(samples: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res" / "domains.h5ad"
    argv = ["domains", "--n-domains", "4", "--levels", "3,6", "--out", str(out), "--save-model", str(tmp_path / "model")]
    for p in samples:
        argv += ["--spatial", str(p)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = []
    for p in samples:
        res = ad.read_h5ad(tmp_path / "res" / f"domains_{p.stem}.h5ad")
        assert res.obs["domain"].dtype == "category"
        assert set(res.obs["domain"].cat.categories) == {f"L4_D{i}" for i in range(4)}
        assert {"domain_level_3", "domain_level_6"} <= set(res.obs.columns)
        assert f"{p}" in printed and "L4_D0=" in printed
        # printed counts are the real ones
        n0 = int((res.obs["domain"] == "L4_D0").sum())
        assert f"L4_D0={n0}" in printed
        results.append(res)
    # one model for both: the same truth maps onto the same ids, and the domains are real
    for res in results:
        assert adjusted_rand_score(res.obs["true_domain"], res.obs["domain"]) >= 0.5
    assert (tmp_path / "model" / "domain_model.json").is_file()
    # the summary lists every file written: both outputs and the model's files
    listed = {line.split()[-1] for line in printed.split("files written:\n", 1)[1].splitlines() if line.startswith("  ")}
    assert listed == {str(tmp_path / "res" / f"domains_{p.stem}.h5ad") for p in samples} | {
        str(f) for f in (tmp_path / "model").iterdir()
    }
    assert not list((tmp_path / "res").glob("*.tmp*")) and len(list((tmp_path / "res").iterdir())) == 2


def test_single_input_writes_out_itself(samples: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "one.h5ad"
    assert main(["domains", "--spatial", str(samples[0]), "--n-domains", "3", "--out", str(out)]) == 0
    assert ad.read_h5ad(out).obs["domain"].nunique() <= 3


def test_error_names_the_file_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_synthetic_tissue(300, n_domains=2, n_samples=1, seed=0)
    a.obsm["spatial"][3, 1] = np.nan
    bad = tmp_path / "bad_sample.h5ad"
    a.write_h5ad(bad)
    out = tmp_path / "out.h5ad"
    assert main(["domains", "--spatial", str(bad), "--n-domains", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "bad_sample.h5ad" in err and "NaN" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_sample.h5ad"]
    with pytest.raises(InputError, match="share a file name"):
        output_paths(["a/x.h5ad", "b/x.h5ad"], "o.h5ad")


def test_bad_levels_exit_2(samples: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["domains", "--spatial", str(samples[0]), "--n-domains", "3", "--levels", "5,x", "--out", str(tmp_path / "o.h5ad")]) == 2
    assert "error: --levels must be comma-separated integers, got '5,x'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.s3
def test_s3_in_and_out(samples: list[Path], s3_env: S3Settings, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    uri_in = f"s3://{s3_bucket}/in/{samples[0].name}"
    upload_file(samples[0], uri_in, settings=s3_env)
    uri_out = f"s3://{s3_bucket}/out/domains.h5ad"
    assert main(["domains", "--spatial", uri_in, "--n-domains", "4", "--out", uri_out]) == 0
    res = ad.read_h5ad(fetch_to_cache(uri_out, settings=s3_env))
    assert res.obs["domain"].nunique() == 4 and res.n_obs == ad.read_h5ad(samples[0]).n_obs
