"""Novae checkpoints: offline guarantees and validation of what from_pretrained would load silently (novae/checkpoint.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("novae", reason="the Novae engine is an optional extra: pip install 'spatial_assets[novae]'")
pytest.importorskip("torch", reason="the Novae engine is an optional extra: pip install 'spatial_assets[novae]'")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from spatial_assets.domains.novae.engine import (  # noqa: E402
    NovaeCheckpointError,
    NovaeDomainEngine,
    NovaeDomainModel,
    load_network,
    resolve_checkpoint,
)
from spatial_assets_tests.domains.novae.helpers import NETWORK_ATTEMPTS, TINY, _engine  # noqa: E402


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


def test_checkpoint_with_other_genes_refused(samples: list, saved_dir: Path) -> None:
    renamed = samples[0].copy()
    renamed.var_names = [f"unknown_gene{i}" for i in range(renamed.n_vars)]
    eng = _engine(mode="fine_tune", pretrained_dir=str(saved_dir))
    with pytest.raises(NovaeCheckpointError, match="unknown_gene0"):
        eng.fit([renamed], levels=[2], n_domains=2)
    with pytest.raises(NovaeCheckpointError, match="vocabulary"):
        NovaeDomainModel.load(saved_dir).assign(renamed)


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
