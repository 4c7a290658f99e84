"""Novae engine: the domain-engine contract, fit modes, errors, determinism, run_domains (novae/engine.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("novae", reason="the Novae engine is an optional extra: pip install 'spatial_assets[novae]'")
pytest.importorskip("torch", reason="the Novae engine is an optional extra: pip install 'spatial_assets[novae]'")

import os  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spatial_assets.domains.engine import (  # noqa: E402
    DOMAIN_EMBEDDING_OBSM,
    DomainInputError,
    get_engine,
    level_key,
)
from spatial_assets.domains.novae.engine import (  # noqa: E402
    NovaeDomainEngine,
    NovaeDomainModel,
)
from spatial_assets.domains.synthetic import make_synthetic_tissue  # noqa: E402
from spatial_assets_tests.domains.novae.helpers import LEVELS, TINY, _engine  # noqa: E402


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


def test_threads_setting_honoured_and_restored(samples: list) -> None:
    before = torch.get_num_threads()
    m = _engine(threads=2, limit_train_batches=1).fit(samples[:1], levels=[2], n_domains=2, seed=0)
    assert m.metadata()["threads_in_training"] == 2
    assert torch.get_num_threads() == before
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"


def test_same_seed_same_model_other_seed_differs(samples: list, trained: NovaeDomainModel) -> None:
    again = _engine().fit(samples, levels=LEVELS, n_domains=4, seed=0)
    a, b = trained.assign(samples[1]), again.assign(samples[1])
    np.testing.assert_array_equal(a.obsm[DOMAIN_EMBEDDING_OBSM], b.obsm[DOMAIN_EMBEDDING_OBSM])
    for k in LEVELS:
        assert (a.obs[level_key(k)] == b.obs[level_key(k)]).all()
    other = _engine().fit(samples, levels=LEVELS, n_domains=4, seed=1).assign(samples[1])
    assert not np.allclose(a.obsm[DOMAIN_EMBEDDING_OBSM], other.obsm[DOMAIN_EMBEDDING_OBSM])


def test_fine_tune_from_local_checkpoint(samples: list, saved_dir: Path) -> None:
    eng = _engine(mode="fine_tune", pretrained_dir=str(saved_dir))
    m = eng.fit(samples[1:], levels=[2], n_domains=2, seed=0)
    meta = m.metadata()
    assert meta["checkpoint"].endswith("novae") and meta["collapse"]["train_steps"] == 2
    assert m.genes == NovaeDomainModel.load(saved_dir).genes
    assert set(m.assign(samples[1]).obs["domain"].astype(str)) <= {"L2_D0", "L2_D1"}


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
