"""Training: celltypist-compatible bytes, bit-identical reruns, integrity check, calibration."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from spatial_assets.celltyping.training import (
    ModelIntegrityError,
    TrainingError,
    fit_temperature,
    load_model,
    save_model,
    train_model,
)


def _training_set(seed: int = 0, n_per: int = 150, n_genes: int = 40, k: int = 4) -> AnnData:
    """log1p-normalised gamma-Poisson counts with one block of 5 marker genes per class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"type{i}" for i in range(k)], n_per)
    mu = np.full((k, n_genes), 2.0)
    for i in range(k):
        mu[i, i * 5 : i * 5 + 5] = 12.0
    counts = rng.poisson(rng.gamma(4.0, mu[np.repeat(np.arange(k), n_per)] / 4.0)).astype(np.float32)
    x = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    obs = pd.DataFrame(
        {"cell_type": labels, "original_label": [f"orig_{l}" for l in labels], "cell_type_ontology_term_id": "CL:0000000"},
        index=[f"c{i}" for i in range(len(labels))],
    )
    a = AnnData(X=sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    a.uns["references"] = {"refA": {"sha256": "ab" * 32}}
    return a


def test_model_loads_in_celltypist_and_predicts(tmp_path):
    import celltypist

    train = _training_set()
    model = train_model(train, seed=0)
    path = tmp_path / "model.pkl"
    digest = save_model(model, path)
    ct = celltypist.models.Model.load(str(path))
    assert list(ct.features) == model.genes
    assert list(ct.cell_types) == ["type0", "type1", "type2", "type3"]
    # celltypist's own predict path on the scaled matrix reproduces the training labels
    scaled = ct.scaler.transform(train.X.toarray())
    _, _, labels = ct.predict_labels_and_prob(scaled)
    assert (labels == train.obs["cell_type"].to_numpy()).mean() > 0.95
    card = json.loads((tmp_path / "model.pkl.card.json").read_text())
    assert card["sha256"] == digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["n_cells_per_class"] == {f"type{i}": 150 for i in range(4)}
    assert card["label_map"]["type0"] == ["orig_type0"]
    assert card["references"]["refA"]["sha256"] == "ab" * 32
    assert card["ontology"]["type1"]["term_id"] == "CL:0000000"
    assert "scikit-learn" in card["versions"]


def test_two_runs_give_bit_identical_bytes(tmp_path):
    train = _training_set()
    d1 = save_model(train_model(train, seed=3), tmp_path / "a.pkl")
    d2 = save_model(train_model(train, seed=3), tmp_path / "b.pkl")
    assert d1 == d2
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
    assert (tmp_path / "a.pkl.card.json").read_bytes() == (tmp_path / "b.pkl.card.json").read_bytes()


def test_tampered_model_is_refused_before_unpickling(tmp_path):
    path = tmp_path / "m.pkl"
    digest = save_model(train_model(_training_set()), path)
    loaded = load_model(path, digest)
    assert loaded.sha256 == digest and loaded.classes == ["type0", "type1", "type2", "type3"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError) as err:
        load_model(path, digest)
    msg = str(err.value)
    assert str(path) in msg and digest in msg and hashlib.sha256(bytes(data)).hexdigest() in msg


def test_single_class_is_an_error_naming_the_class():
    train = _training_set(k=2)
    one = train[train.obs["cell_type"] == "type0"].copy()
    with pytest.raises(TrainingError, match="type0"):
        train_model(one)
    with pytest.raises(TrainingError, match="nope"):
        train_model(train, label_column="nope")


def test_temperature_recovers_a_known_temperature():
    # labels drawn from softmax(L / 2.5): the NLL-optimal temperature is 2.5 up to sampling noise
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(20000, 5))
    p = np.exp(logits / 2.5)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(logits, y) == pytest.approx(2.5, rel=0.05)


def test_strong_default_regularisation_is_per_cell():
    small = train_model(_training_set(n_per=50))
    large = train_model(_training_set(n_per=200))
    # C = 1 / (reg_per_cell * n): 4x the cells -> 1/4 the C
    assert small.card["parameters"]["C"] / large.card["parameters"]["C"] == pytest.approx(4.0)


def test_default_model_averages_the_regularisation_path():
    from spatial_assets.celltyping.training import DEFAULT_REG_PATH

    data = _training_set()
    averaged = train_model(data)
    members = [train_model(data, reg_per_cell=r) for r in DEFAULT_REG_PATH]
    path = averaged.card["parameters"]["regularization_path"]
    assert [m["reg_per_cell"] for m in path] == sorted(DEFAULT_REG_PATH, reverse=True)
    # one linear model whose weights are the members' mean (members fitted as single models agree
    # with the warm-started path members to optimiser tolerance)
    mean_w = np.mean([m.classifier.coef_ for m in members], axis=0)
    assert np.allclose(averaged.classifier.coef_, mean_w, atol=2e-3 * np.abs(mean_w).max())
    # and it sits between the strongest and the weakest member in size
    norms = [np.linalg.norm(m.classifier.coef_) for m in members]
    assert min(norms) < np.linalg.norm(averaged.classifier.coef_) < max(norms)
    single = train_model(data, reg_per_cell=0.2)
    assert len(single.card["parameters"]["regularization_path"]) == 1
    with pytest.raises(TrainingError, match="positive"):
        train_model(data, reg_per_cell=[0.1, 0.0])
