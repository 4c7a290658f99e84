"""Cap & Fill: exact allocation arithmetic and seeded, source-aware subsampling."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.core import schema
from spatial_assets.celltyping.balancing import (
    BalancingError,
    allocate_source_targets,
    cap_and_fill,
    resolve_target_proportions,
)

# ---------- allocate_source_targets ----------


def test_worked_examples() -> None:
    # 10,000 × 30/35 = 8571.43 and 10,000 × 5/35 = 1428.57
    assert allocate_source_targets({"s1": 30_000, "s2": 5_000}, 10_000) == {"s1": 8571, "s2": 1429}
    assert allocate_source_targets({"s1": 30_000, "s2": 5_000}, 10_000, strategy="equal") == {"s1": 5000, "s2": 5000}
    # the small source gives all it has, the large one fills the shortfall
    assert allocate_source_targets({"s1": 30_000, "s2": 2_000}, 10_000, strategy="equal") == {"s1": 8000, "s2": 2000}
    # a minimum only lifts sources whose proportional share is below it
    assert allocate_source_targets({"s1": 30_000, "s2": 5_000}, 10_000, min_per_source=2000) == {"s1": 8000, "s2": 2000}
    assert allocate_source_targets({"a": 30_000, "b": 100, "c": 0}, 10_000, min_per_source=500) == {"a": 9900, "b": 100, "c": 0}
    # target above availability: everything, never more
    assert allocate_source_targets({"a": 3, "b": 4}, 100) == {"a": 3, "b": 4}
    assert allocate_source_targets({}, 10) == {}


def test_three_way_equal_with_redistribution() -> None:
    # level L: 50 + 2L = 300 → L = 125 for the two unsaturated sources
    assert allocate_source_targets({"a": 1000, "b": 50, "c": 400}, 300, strategy="equal") == {"a": 125, "b": 50, "c": 125}


def _check_allocation(sizes: dict[str, int], target: int, strategy: str, m: int) -> None:
    out = allocate_source_targets(sizes, target, strategy=strategy, min_per_source=m)
    total = sum(sizes.values())
    want = min(target, total)
    assert list(out) == list(sizes)
    assert sum(out.values()) == want
    assert all(0 <= out[s] <= sizes[s] for s in sizes)
    floors = {s: min(m, n) for s, n in sizes.items()}
    if sum(floors.values()) <= want:
        assert all(out[s] >= floors[s] for s in sizes)
    elif m:
        assert all(out[s] <= floors[s] for s in sizes)
    if m == 0 and strategy == "proportional" and total:
        # within one cell of the exact proportional share
        for s, n in sizes.items():
            assert abs(Fraction(out[s]) - Fraction(n * want, total)) < 1
    if m == 0 and strategy == "equal":
        # water-filling: every source not exhausted sits at the common level (±1)
        level = max(out.values(), default=0)
        for s, n in sizes.items():
            assert out[s] == n or out[s] >= level - 1


def test_property_random_sources() -> None:
    rng = np.random.default_rng(12345)
    for _ in range(600):
        k = int(rng.integers(1, 7))
        scale = int(rng.choice([5, 100, 50_000]))
        sizes = {f"src{i}": int(rng.integers(0, scale)) for i in range(k)}
        target = int(rng.integers(0, 2 * max(1, sum(sizes.values())) + 2))
        strategy = str(rng.choice(["proportional", "equal"]))
        m = int(rng.choice([0, 0, 1, 3, scale // 4]))
        _check_allocation(sizes, target, strategy, m)


def test_allocation_input_errors() -> None:
    with pytest.raises(BalancingError, match="'balanced'"):
        allocate_source_targets({"a": 1}, 1, strategy="balanced")
    with pytest.raises(BalancingError, match="'s2'"):
        allocate_source_targets({"s1": 3, "s2": -1}, 1)
    with pytest.raises(BalancingError):
        allocate_source_targets({"s1": 3}, -5)


# ---------- resolve_target_proportions ----------

CLASSES = ["A", "B", "C"]


def test_resolve_dict_json_csv(tmp_path: Path) -> None:
    spec = {"A": 0.5, "C": 0.25}
    (tmp_path / "p.json").write_text(json.dumps(spec))
    pd.DataFrame({"cell_type": ["A", "C"], "proportion": [0.5, 0.25]}).to_csv(tmp_path / "p.csv", index=False)
    assert resolve_target_proportions(spec, CLASSES) == spec
    assert resolve_target_proportions(tmp_path / "p.json", CLASSES) == spec
    assert resolve_target_proportions(str(tmp_path / "p.csv"), CLASSES) == spec
    assert resolve_target_proportions(None, CLASSES) is None


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(BalancingError, match=r"'Z'.*\['A', 'B', 'C'\]"):
        resolve_target_proportions({"Z": 0.1}, CLASSES)
    with pytest.raises(BalancingError, match="'A'.*\\[0, 1\\]"):
        resolve_target_proportions({"A": 1.5}, CLASSES)
    with pytest.raises(BalancingError, match="'B'"):
        resolve_target_proportions({"B": -0.1}, CLASSES)
    with pytest.raises(BalancingError, match="sum to 1.2"):
        resolve_target_proportions({"A": 0.6, "B": 0.6}, CLASSES)
    with pytest.raises(BalancingError, match="not a number"):
        resolve_target_proportions({"A": "lots"}, CLASSES)
    bad_csv = tmp_path / "bad.csv"
    pd.DataFrame({"type": ["A"], "proportion": [0.1]}).to_csv(bad_csv, index=False)
    with pytest.raises(BalancingError, match=r"bad\.csv.*cell_type"):
        resolve_target_proportions(bad_csv, CLASSES)
    with pytest.raises(BalancingError, match="missing.json"):
        resolve_target_proportions(tmp_path / "missing.json", CLASSES)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(BalancingError, match="broken.json"):
        resolve_target_proportions(tmp_path / "broken.json", CLASSES)


# ---------- cap_and_fill ----------


def _reference() -> ad.AnnData:
    """A: 30,000 (s1) + 5,000 (s2); B: 2,000 (s1); C: 300 (s2) + 200 (s3)."""
    parts = [("A", "s1", 30_000), ("A", "s2", 5_000), ("B", "s1", 2_000), ("C", "s2", 300), ("C", "s3", 200)]
    labels = np.concatenate([[c] * n for c, _, n in parts])
    sources = np.concatenate([[s] * n for _, s, n in parts])
    rng = np.random.default_rng(7)
    order = rng.permutation(len(labels))  # interleave so row order carries no class signal
    n = len(labels)
    x = sp.random(n, 20, density=0.05, format="csr", random_state=1, dtype=np.float32)
    obs = pd.DataFrame(
        {schema.CELL_TYPE: labels[order], schema.REFERENCE_SOURCE: sources[order]},
        index=[f"cell{i}" for i in range(n)],
    )
    return ad.AnnData(X=x, obs=obs)


@pytest.fixture(scope="module")
def ref() -> ad.AnnData:
    return _reference()


def _counts(a: ad.AnnData) -> dict[tuple[str, str], int]:
    return a.obs.groupby([schema.CELL_TYPE, schema.REFERENCE_SOURCE], observed=True).size().to_dict()


def test_cap_and_fill_worked_example(ref: ad.AnnData) -> None:
    out = cap_and_fill(ref, max_cells_per_type=10_000, seed=0)
    assert _counts(out) == {("A", "s1"): 8571, ("A", "s2"): 1429, ("B", "s1"): 2000, ("C", "s2"): 300, ("C", "s3"): 200}
    assert out.n_obs == 12_500
    assert sp.issparse(out.X)
    # original row order kept, rows are the same cells with the same data
    pos = ref.obs_names.get_indexer(out.obs_names)
    assert (np.diff(pos) > 0).all()
    assert (out.X != ref.X[pos]).nnz == 0
    rec = out.uns["balancing"]
    table = pd.DataFrame(rec["counts"])
    assert table["selected"].sum() == 12_500 and table["available"].sum() == ref.n_obs
    assert dict(zip(rec["classes"]["cell_type"], rec["classes"]["target"])) == {"A": 10_000, "B": 2000, "C": 500}


def test_equal_strategy_and_min_per_source(ref: ad.AnnData) -> None:
    eq = cap_and_fill(ref, max_cells_per_type=10_000, strategy="equal")
    assert _counts(eq)[("A", "s1")] == 5000 and _counts(eq)[("A", "s2")] == 5000
    # C cap 400 split equally 200/200 (s3 holds exactly 200)
    small = cap_and_fill(ref, max_cells_per_type=400, strategy="equal")
    assert _counts(small)[("C", "s2")] == 200 and _counts(small)[("C", "s3")] == 200
    # cap 1000, proportional A = 857/143; a minimum of 300 lifts s2
    mn = cap_and_fill(ref, max_cells_per_type=1000, min_per_source=300)
    assert _counts(mn)[("A", "s1")] == 700 and _counts(mn)[("A", "s2")] == 300


def test_cap_never_exceeded(ref: ad.AnnData) -> None:
    for cap in (1, 7, 499, 500, 501, 2001):
        out = cap_and_fill(ref, max_cells_per_type=cap, seed=3)
        per_class = out.obs[schema.CELL_TYPE].value_counts()
        avail = ref.obs[schema.CELL_TYPE].value_counts()
        for c in avail.index:
            assert per_class.get(c, 0) == min(cap, avail[c])


def test_seed_determinism(ref: ad.AnnData) -> None:
    a = cap_and_fill(ref, max_cells_per_type=1000, seed=11)
    b = cap_and_fill(ref, max_cells_per_type=1000, seed=11)
    c = cap_and_fill(ref, max_cells_per_type=1000, seed=12)
    assert list(a.obs_names) == list(b.obs_names)
    assert list(a.obs_names) != list(c.obs_names)
    assert _counts(a) == _counts(c)  # only which cells, never how many
    # a class's draw does not depend on which other classes are present
    no_b = ref[ref.obs[schema.CELL_TYPE] != "B"].copy()
    d = cap_and_fill(no_b, max_cells_per_type=1000, seed=11)
    sel = lambda x: set(x.obs_names[x.obs[schema.CELL_TYPE] == "A"])  # noqa: E731
    assert sel(a) == sel(d)


def test_inputs_not_mutated(ref: ad.AnnData) -> None:
    obs_before = ref.obs.copy()
    x_before = ref.X.copy()
    spec = {"A": 0.5}
    cap_and_fill(ref, max_cells_per_type=1000, target_proportions=spec)
    assert spec == {"A": 0.5}
    pd.testing.assert_frame_equal(ref.obs, obs_before)
    assert (ref.X != x_before).nnz == 0
    assert "balancing" not in ref.uns


def test_target_proportions_against_final_size(ref: ad.AnnData, tmp_path: Path) -> None:
    # capped set = 10,000 + 2,000 + 500 = 12,500 → A gets 0.5 × 12,500 = 6,250 (cap not applied);
    # B and C share the other 6,250 by capped size but cannot exceed 2,000 / 500
    spec = {"A": 0.5}
    (tmp_path / "p.json").write_text(json.dumps(spec))
    pd.DataFrame({"cell_type": ["A"], "proportion": [0.5]}).to_csv(tmp_path / "p.csv", index=False)
    outs = [cap_and_fill(ref, max_cells_per_type=10_000, target_proportions=s) for s in (spec, tmp_path / "p.json", tmp_path / "p.csv")]
    for out in outs:
        vc = out.obs[schema.CELL_TYPE].value_counts().to_dict()
        assert vc == {"A": 6250, "B": 2000, "C": 500}
        assert list(out.obs_names) == list(outs[0].obs_names)
    # explicit output size 4,000: A = 2,000; B:C share 2,000 as 2,000:500 → 1,600 / 400
    out = cap_and_fill(ref, max_cells_per_type=10_000, target_proportions=spec, output_size=4000)
    assert out.obs[schema.CELL_TYPE].value_counts().to_dict() == {"A": 2000, "B": 1600, "C": 400}
    assert out.uns["balancing"]["output_size_requested"] == 4000
    # a listed class cannot get more than exists: C asks for 0.1 × 12,500 = 1,250, has 500
    short = cap_and_fill(ref, max_cells_per_type=10_000, target_proportions={"C": 0.1})
    assert short.obs[schema.CELL_TYPE].value_counts()["C"] == 500


def test_proportion_rounding_never_overshoots(ref: ad.AnnData) -> None:
    out = cap_and_fill(ref, max_cells_per_type=10_000, target_proportions={"A": 0.5, "B": 0.5}, output_size=5)
    vc = out.obs[schema.CELL_TYPE].value_counts()
    assert vc.sum() == 5 and set(vc.to_numpy()) == {2, 3}


def test_cap_and_fill_errors(ref: ad.AnnData) -> None:
    with pytest.raises(BalancingError, match="'donor'"):
        cap_and_fill(ref, source_column="donor")
    with pytest.raises(BalancingError, match="'celltype'"):
        cap_and_fill(ref, label_column="celltype")
    with pytest.raises(BalancingError, match="'stratified'"):
        cap_and_fill(ref, strategy="stratified")
    with pytest.raises(BalancingError, match="'Z'"):
        cap_and_fill(ref, target_proportions={"Z": 0.2})
    with pytest.raises(BalancingError, match="max_cells_per_type"):
        cap_and_fill(ref, max_cells_per_type=0)


def test_single_source_and_h5ad_roundtrip(tmp_path: Path) -> None:
    obs = pd.DataFrame({schema.CELL_TYPE: ["L2/3"] * 50 + ["Astro"] * 5}, index=[f"c{i}" for i in range(55)])
    a = ad.AnnData(X=sp.csr_matrix(np.ones((55, 3), dtype=np.float32)), obs=obs)
    out = cap_and_fill(a, source_column=None, max_cells_per_type=20)
    assert out.obs[schema.CELL_TYPE].value_counts().to_dict() == {"L2/3": 20, "Astro": 5}
    path = tmp_path / "b.h5ad"
    out.write_h5ad(path)  # class names with "/" must not be used as h5ad keys
    back = ad.read_h5ad(path)
    assert list(back.uns["balancing"]["classes"]["cell_type"]) == ["Astro", "L2/3"]
    assert list(back.uns["balancing"]["classes"]["selected"]) == [5, 20]


def test_categorical_and_string_columns_select_the_same_cells(ref: ad.AnnData) -> None:
    cat = ref.copy()
    cat.obs[schema.CELL_TYPE] = cat.obs[schema.CELL_TYPE].astype("category")
    cat.obs[schema.REFERENCE_SOURCE] = pd.Categorical(cat.obs[schema.REFERENCE_SOURCE], categories=["s3", "s2", "s1", "unused"])
    a = cap_and_fill(ref, max_cells_per_type=777, seed=5)
    b = cap_and_fill(cat, max_cells_per_type=777, seed=5)
    assert list(a.obs_names) == list(b.obs_names)
