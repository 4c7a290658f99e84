"""Novae domain model persistence: save/load identical, reuse, and every recorded pin checked (novae/model.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("novae", reason="the Novae engine is an optional extra: pip install 'spatial_assets[novae]'")
pytest.importorskip("torch", reason="the Novae engine is an optional extra: pip install 'spatial_assets[novae]'")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from spatial_assets.domains.engine import (  # noqa: E402
    DOMAIN_EMBEDDING_OBSM,
    level_key,
    load_model,
)
from spatial_assets.domains.novae.engine import (  # noqa: E402
    NovaeCheckpointError,
    NovaeDomainEngine,
    NovaeDomainModel,
)
from spatial_assets_tests.domains.novae.helpers import LEVELS, TINY, _copy, _engine  # noqa: E402


def test_save_load_identical(samples: list, trained: NovaeDomainModel, saved_dir: Path) -> None:
    files = sorted(p.relative_to(saved_dir).as_posix() for p in saved_dir.rglob("*") if p.is_file())
    assert {"domain_model.json", "leaf_domains.npz", "novae/config.json", "novae/model.safetensors"} <= set(files)
    assert not [f for f in files if f.endswith((".pt", ".pkl", ".bin", ".ckpt"))]  # no pickles
    loaded = load_model(saved_dir)  # engine.py dispatch by domain_model.json
    assert isinstance(loaded, NovaeDomainModel)
    assert loaded.levels == trained.levels and loaded.genes == trained.genes
    a, b = trained.assign(samples[0]), loaded.assign(samples[0])
    np.testing.assert_array_equal(a.obsm[DOMAIN_EMBEDDING_OBSM], b.obsm[DOMAIN_EMBEDDING_OBSM])
    for k in LEVELS:
        assert (a.obs[level_key(k)] == b.obs[level_key(k)]).all()
    assert loaded.metadata()["collapse"] == trained.metadata()["collapse"]


def test_reuse_mode_returns_saved_model(samples: list, trained: NovaeDomainModel, saved_dir: Path) -> None:
    m = NovaeDomainEngine(mode="reuse", pretrained_dir=str(saved_dir)).fit(samples, levels=LEVELS, n_domains=4)
    a, b = trained.assign(samples[1]), m.assign(samples[1])
    assert (a.obs["domain"] == b.obs["domain"]).all()


def test_changed_hyperparameter_refused(saved_dir: Path, tmp_path: Path) -> None:
    d = _copy(saved_dir, tmp_path)
    cfg_path = d / "novae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(NovaeCheckpointError, match="num_layers"):
        NovaeDomainModel.load(d)


def test_changed_gene_vocabulary_refused(saved_dir: Path, tmp_path: Path) -> None:
    d = _copy(saved_dir, tmp_path)
    cfg_path = d / "novae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["var_names"] = [f"other{i}" for i in range(len(cfg["var_names"]))]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(NovaeCheckpointError, match="gene vocabulary"):
        NovaeDomainModel.load(d)


def test_swapped_weights_refused(samples: list, saved_dir: Path, tmp_path: Path) -> None:
    other = _engine(model_kwargs={**TINY, "hidden_size": 48}).fit(samples[:1], levels=[2], n_domains=2, seed=0)
    other.save(tmp_path / "other")
    d = _copy(saved_dir, tmp_path)
    shutil.copy(tmp_path / "other" / "novae" / "model.safetensors", d / "novae" / "model.safetensors")
    with pytest.raises(NovaeCheckpointError, match="sha256"):
        NovaeDomainModel.load(d)
