"""Novae domain engine: contract, persistence, checkpoint validation, offline guarantees, determinism.

Tiny synthetic tissue (generated here, seeded) and a tiny Novae (2 layers, 32 prototypes) so the file
stays well under a minute on a shared 2-core machine. Quality (ARI) is measured by
benchmarks/bench_novae_domains.py, not here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: nothing in this file may download

from spatial_assets.domains.engine import (  # noqa: E402
    DOMAIN_EMBEDDING_OBSM,
    DomainInputError,
    get_engine,
    level_key,
    load_model,
)
from spatial_assets.domains.novae.engine import (  # noqa: E402
    NovaeCheckpointError,
    NovaeCollapseError,
    NovaeDomainEngine,
    NovaeDomainModel,
    effective_rank,
    load_network,
    resolve_checkpoint,
)
from spatial_assets.domains.synthetic import make_synthetic_tissue, split_samples  # noqa: E402

TINY = {"num_prototypes": 32, "heads": 2, "num_layers": 2, "hidden_size": 32, "output_size": 16, "batch_size": 64}
LEVELS = [2, 4]


NETWORK_ATTEMPTS: list[object] = []


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> object:
    """Non-local connections fail (OSError, as offline) and are recorded; a test that made one fails."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1") and not str(host).startswith("/"):
            NETWORK_ATTEMPTS.append(address)
            raise OSError(f"network disabled in tests: {address!r}")
        return real_connect(self, address)

    NETWORK_ATTEMPTS.clear()
    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield
    assert not NETWORK_ATTEMPTS, f"network access attempted: {NETWORK_ATTEMPTS}"


@pytest.fixture(scope="module")
def samples() -> list:
    tissue = make_synthetic_tissue(600, n_domains=4, n_samples=2, n_genes=50, n_cell_types=6, seed=3)
    return split_samples(tissue)


def _engine(**kw: object) -> NovaeDomainEngine:
    base = {"mode": "train", "max_epochs": 1, "limit_train_batches": 2, "threads": 1, "model_kwargs": TINY}
    base.update(kw)
    return NovaeDomainEngine(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(samples: list) -> NovaeDomainModel:
    return _engine().fit(samples, levels=LEVELS, n_domains=4, seed=0)


@pytest.fixture(scope="module")
def saved_dir(trained: NovaeDomainModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("novae") / "model"
    trained.save(d)
    return d


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ contract


def test_fit_assign_levels_and_input_untouched(samples: list, trained: NovaeDomainModel) -> None:
    a = samples[0]
    x_before, obs_cols, obsp_keys = a.X.copy(), list(a.obs.columns), list(a.obsp.keys())
    out = trained.assign(a)
    assert out is not a
    for k in LEVELS:
        col = out.obs[level_key(k)]
        assert list(col.cat.categories) == [f"L{k}_D{i}" for i in range(k)]
    # on the fitting data every level has exactly k domains (both samples together)
    both = [trained.assign(s) for s in samples]
    for k in LEVELS:
        seen = set().union(*(set(o.obs[level_key(k)].astype(str)) for o in both))
        assert seen == {f"L{k}_D{i}" for i in range(k)}
    assert (out.obs["domain"].astype(str) == out.obs[level_key(4)].astype(str)).all()
    emb = out.obsm[DOMAIN_EMBEDDING_OBSM]
    assert emb.shape == (a.n_obs, TINY["output_size"]) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert out.uns["domains"]["engine"] == "novae"
    # caller's object unchanged (Novae normalises X and adds obs/obsp on what it is given)
    assert (a.X != x_before).nnz == 0
    assert list(a.obs.columns) == obs_cols and list(a.obsp.keys()) == obsp_keys


def test_get_engine_by_name_and_protocol() -> None:
    eng = get_engine("novae", mode="zero_shot", model_kwargs=TINY)
    assert isinstance(eng, NovaeDomainEngine) and eng.name == "novae"
    with pytest.raises(DomainInputError, match="mode"):
        NovaeDomainEngine(mode="pretend")  # type: ignore[arg-type]
    with pytest.raises(DomainInputError, match="pretrained_dir"):
        NovaeDomainEngine(mode="fine_tune")


def test_zero_shot_has_k_domains_and_is_not_flagged(samples: list) -> None:
    m = _engine(mode="zero_shot").fit(samples, levels=LEVELS, n_domains=4, seed=0)
    meta = m.metadata()
    assert meta["collapse"]["collapsed"] is False
    assert meta["collapse"]["latent_effective_rank"] > 3.0
    assert "train_steps" not in meta["collapse"]
    labels = np.concatenate([m.assign(s).obs["domain"].astype(str).to_numpy() for s in samples])
    assert len(set(labels)) == 4


def test_fewer_cells_than_prototypes_refused(samples: list) -> None:
    eng = _engine(mode="zero_shot", model_kwargs={**TINY, "num_prototypes": 512})
    with pytest.raises(DomainInputError, match="fewer than the model's 512 prototypes"):
        eng.fit(samples[:1], levels=[2], n_domains=2)


def test_missing_coordinates_named(samples: list, trained: NovaeDomainModel) -> None:
    bad = samples[0].copy()
    del bad.obsm["spatial"]
    with pytest.raises(DomainInputError, match=r"obsm\['spatial'\]"):
        trained.assign(bad)


# ---------------------------------------------------------------------------- training record, threads


def test_training_record_threads_and_collapse_flag(trained: NovaeDomainModel) -> None:
    c = trained.metadata()["collapse"]
    assert c["train_steps"] == 2 and c["train_epochs"] == 1
    assert math.isclose(c["ln_num_prototypes"], math.log(32), rel_tol=1e-3)
    # two steps cannot beat a uniform assignment: the run must be reported, not hidden
    assert c["train_loss_over_ln_prototypes"] > 0.95
    assert c["collapsed"] is True and c["collapse_reasons"]
    assert trained.metadata()["threads_in_training"] == 1
    assert trained.metadata()["seconds"]["train_step_median"] > 0


def test_threads_setting_honoured_and_restored(samples: list) -> None:
    before = torch.get_num_threads()
    m = _engine(threads=2, limit_train_batches=1).fit(samples[:1], levels=[2], n_domains=2, seed=0)
    assert m.metadata()["threads_in_training"] == 2
    assert torch.get_num_threads() == before
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"


def test_strict_collapse_raises(samples: list) -> None:
    with pytest.raises(NovaeCollapseError, match="collapsed"):
        _engine(strict_collapse=True).fit(samples, levels=[2], n_domains=2, seed=0)


def test_effective_rank_numbers() -> None:
    rng = np.random.default_rng(0)
    line = np.outer(rng.normal(size=500), rng.normal(size=16))
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    iso = rng.normal(size=(5000, 16))
    assert 14.5 < effective_rank(iso) <= 16.0  # ≈ d for isotropic data


# ------------------------------------------------------------------------------- determinism


def test_same_seed_same_model_other_seed_differs(samples: list, trained: NovaeDomainModel) -> None:
    again = _engine().fit(samples, levels=LEVELS, n_domains=4, seed=0)
    a, b = trained.assign(samples[1]), again.assign(samples[1])
    np.testing.assert_array_equal(a.obsm[DOMAIN_EMBEDDING_OBSM], b.obsm[DOMAIN_EMBEDDING_OBSM])
    for k in LEVELS:
        assert (a.obs[level_key(k)] == b.obs[level_key(k)]).all()
    other = _engine().fit(samples, levels=LEVELS, n_domains=4, seed=1).assign(samples[1])
    assert not np.allclose(a.obsm[DOMAIN_EMBEDDING_OBSM], other.obsm[DOMAIN_EMBEDDING_OBSM])


# --------------------------------------------------------------------------------- persistence


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


def test_plain_checkpoint_config_mismatch_refused_where_novae_is_silent(samples: list, tmp_path: Path) -> None:
    import novae

    # one head, hidden == output size: a 3-layer checkpoint described as 2 layers has no shape conflict
    m = _engine(mode="zero_shot", model_kwargs={**TINY, "hidden_size": 16, "heads": 1, "num_layers": 3}).fit(
        samples[:1], levels=[2], n_domains=2
    )
    m.save(tmp_path / "m")
    d = tmp_path / "m" / "novae"
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    novae.Novae.from_pretrained(str(d))  # Novae itself loads this silently (non-strict) ...
    with pytest.raises(NovaeCheckpointError, match="unexpected tensors"):
        load_network(d)  # ... we refuse it
    cfg["num_layers"] = 4  # one layer more than the weights: would stay random, silently
    (d / "config.json").write_text(json.dumps(cfg))
    novae.Novae.from_pretrained(str(d))
    with pytest.raises(NovaeCheckpointError, match="missing from the file"):
        load_network(d)
    cfg["num_layers"], cfg["hidden_size"] = 3, 8  # torch raises a size mismatch: surfaced as a named error
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NovaeCheckpointError, match="cannot load"):
        load_network(d)


def test_fine_tune_from_local_checkpoint(samples: list, saved_dir: Path) -> None:
    eng = _engine(mode="fine_tune", pretrained_dir=str(saved_dir))
    m = eng.fit(samples[1:], levels=[2], n_domains=2, seed=0)
    meta = m.metadata()
    assert meta["checkpoint"].endswith("novae") and meta["collapse"]["train_steps"] == 2
    assert m.genes == NovaeDomainModel.load(saved_dir).genes
    assert set(m.assign(samples[1]).obs["domain"].astype(str)) <= {"L2_D0", "L2_D1"}


def test_checkpoint_with_other_genes_refused(samples: list, saved_dir: Path) -> None:
    renamed = samples[0].copy()
    renamed.var_names = [f"unknown_gene{i}" for i in range(renamed.n_vars)]
    eng = _engine(mode="fine_tune", pretrained_dir=str(saved_dir))
    with pytest.raises(NovaeCheckpointError, match="unknown_gene0"):
        eng.fit([renamed], levels=[2], n_domains=2)
    with pytest.raises(NovaeCheckpointError, match="vocabulary"):
        NovaeDomainModel.load(saved_dir).assign(renamed)


# ------------------------------------------------------------------------------------------- offline


def test_hub_id_refused_offline(samples: list) -> None:
    with pytest.raises(NovaeCheckpointError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint("prism-oncology/novae-mouse-0")
    eng = NovaeDomainEngine(mode="zero_shot", pretrained_dir="prism-oncology/novae-mouse-0")
    with pytest.raises(NovaeCheckpointError, match="HF_HUB_OFFLINE"):
        eng.fit(samples, levels=[2], n_domains=2)


def test_hub_id_refused_when_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # the guard makes huggingface.co unreachable, as it is on this machine anyway
    with pytest.raises(NovaeCheckpointError, match="unreachable"):
        resolve_checkpoint("prism-oncology/novae-mouse-0")
    assert len(NETWORK_ATTEMPTS) <= 1  # at most the one connectivity probe (DNS may fail first)
    NETWORK_ATTEMPTS.clear()


def test_missing_local_checkpoint_refused(tmp_path: Path) -> None:
    with pytest.raises(NovaeCheckpointError, match="not found"):
        resolve_checkpoint(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NovaeCheckpointError, match="config.json missing"):
        resolve_checkpoint(tmp_path / "empty")


def test_run_domains_one_input_split_by_batch_key_writes_h5ad(tmp_path: Path) -> None:
    """Through engine.run_domains: one AnnData holding two samples; output must survive h5ad."""
    import anndata as ad

    from spatial_assets.domains.engine import run_domains

    tissue = make_synthetic_tissue(600, n_domains=4, n_samples=2, n_genes=50, n_cell_types=6, seed=3)
    outs, model = run_domains(
        tissue, n_domains=4, levels=[2], method="novae", batch_key="sample_id",
        mode="zero_shot", model_kwargs=TINY,
    )
    assert model.metadata()["n_samples_fit"] == 1 and model.levels == [2, 4]
    out = outs[0]
    assert set(out.obs["domain"].astype(str)) == {f"L4_D{i}" for i in range(4)}
    out.write_h5ad(tmp_path / "o.h5ad")
    back = ad.read_h5ad(tmp_path / "o.h5ad")
    assert back.uns["domains"]["engine"] == "novae"
    assert (back.obs["domain"] == out.obs["domain"]).all()
