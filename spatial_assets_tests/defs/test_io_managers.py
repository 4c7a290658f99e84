"""IO managers: every format round-trips through Dagster on a directory and on the real SeaweedFS S3."""

import hashlib
import json
from pathlib import Path
from typing import Any

import anndata as ad
import dagster as dg
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.core import schema
from spatial_assets.defs.io_managers import (
    LocalObjectStoreIOManager,
    ModelCardError,
    ObjectStoreIOManager,
    S3ObjectStoreIOManager,
    SerializationError,
    UnsupportedValueError,
)
from spatial_assets.defs.deployment import build_resources
from spatial_assets.defs.resources import StorageConfigError, StorageResource
from spatial_assets.core.ids import InvalidIdError
from spatial_assets.storage.objectstore import S3Settings
from spatial_assets.celltyping.training import ModelIntegrityError, TrainedModel, train_model


def _adata(n_obs: int = 40, n_vars: int = 12, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = sp.random(n_obs, n_vars, density=0.3, format="csr", random_state=seed, dtype=np.float32)
    X.data[:] = rng.integers(1, 20, size=X.nnz)
    a = ad.AnnData(
        X=X,
        obs=pd.DataFrame(
            {schema.CELL_TYPE: pd.Categorical(rng.choice(["T", "B", "NK"], n_obs))},
            index=[f"c{i}" for i in range(n_obs)],
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_vars)]),
    )
    a.layers[schema.COUNTS_LAYER] = X.copy()
    a.obsm[schema.SPATIAL_OBSM] = rng.normal(size=(n_obs, 2))
    a.uns[schema.PROVENANCE_UNS] = {"seed": seed}
    return a


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    rng = np.random.default_rng(1)
    centers = rng.normal(0, 3, size=(3, 8))
    y = np.repeat(["A", "B", "C"], 30)
    X = np.vstack([centers[i] + rng.normal(size=(30, 8)) for i in range(3)]).astype(np.float32)
    a = ad.AnnData(X=X, obs=pd.DataFrame({schema.CELL_TYPE: y}, index=[f"c{i}" for i in range(90)]))
    a.var_names = [f"g{j}" for j in range(8)]
    return train_model(a, seed=0)


@pytest.fixture(params=["local", "s3"])
def io_manager(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStoreIOManager:
    if request.param == "local":
        return LocalObjectStoreIOManager(root=str(tmp_path / "root"), prefix="assets")
    settings: S3Settings = request.getfixturevalue("s3_settings")
    return S3ObjectStoreIOManager(
        bucket=request.getfixturevalue("s3_bucket"),
        prefix="assets",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        region_name=settings.region_name,
        cache_dir=str(tmp_path / "cache"),
    )


def _meta(result: dg.ExecuteInProcessResult, asset: str | list[str]) -> dict[str, Any]:
    key = dg.AssetKey(asset if isinstance(asset, list) else [asset])
    mats = [e.materialization for e in result.get_asset_materialization_events() if e.asset_key == key]
    assert len(mats) == 1, key
    return {k: getattr(v, "value", v) for k, v in mats[0].metadata.items()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_all_formats_round_trip(io_manager: ObjectStoreIOManager, model: TrainedModel) -> None:
    cells = _adata()
    table = pd.DataFrame({"score": [0.5, 0.25, 1.0], "label": ["a", "b", "c"]}, index=["x", "y", "z"])
    summary = {"n": 3, "labels": ["a", "b"], "nested": {"f": 1.5}, "np": np.int64(7)}
    seen: dict[str, Any] = {}

    @dg.asset(key_prefix=["celltyping"])
    def cells_asset() -> ad.AnnData:
        return cells

    @dg.asset
    def table_asset() -> pd.DataFrame:
        return table

    @dg.asset
    def summary_asset() -> dict:
        return summary

    @dg.asset
    def model_asset() -> TrainedModel:
        return model

    @dg.asset(ins={"cells_asset": dg.AssetIn(key=["celltyping", "cells_asset"])})
    def consumer(cells_asset: ad.AnnData, table_asset: pd.DataFrame, summary_asset: dict, model_asset: TrainedModel) -> None:
        seen.update(cells=cells_asset, table=table_asset, summary=summary_asset, model=model_asset)

    @dg.asset(ins={"cells_asset": dg.AssetIn(key=["celltyping", "cells_asset"])})
    def untyped_consumer(cells_asset, table_asset, summary_asset, model_asset) -> None:  # noqa: ANN001 - format probed
        seen.update(untyped=(cells_asset, table_asset, summary_asset, model_asset))

    result = dg.materialize(
        [cells_asset, table_asset, summary_asset, model_asset, consumer, untyped_consumer],
        resources={"io_manager": io_manager},
    )
    assert result.success
    store = io_manager.get_store()
    assert sorted(i.key for i in store.list("assets/")) == [
        "assets/celltyping/cells_asset.h5ad",
        "assets/model_asset.pkl",
        "assets/model_asset.pkl.card.json",
        "assets/summary_asset.json",
        "assets/table_asset.parquet",
    ]
    # metadata: sha256 and size of the bytes actually stored, computed here independently
    for asset, key in [
        (["celltyping", "cells_asset"], "assets/celltyping/cells_asset.h5ad"),
        ("table_asset", "assets/table_asset.parquet"),
        ("summary_asset", "assets/summary_asset.json"),
        ("model_asset", "assets/model_asset.pkl"),
    ]:
        meta = _meta(result, asset)
        data = store.read_bytes(key)
        assert meta["sha256"] == _sha(data), asset
        assert meta["size_bytes"] == len(data), asset
        assert meta["uri"] == store.uri(key), asset
    m = _meta(result, ["celltyping", "cells_asset"])
    assert (m["n_obs"], m["n_vars"], m["format"]) == (40, 12, "h5ad")
    assert (_meta(result, "table_asset")["n_rows"], _meta(result, "table_asset")["n_cols"]) == (3, 2)
    assert json.loads(store.read_bytes("assets/model_asset.pkl.card.json"))["sha256"] == _meta(result, "model_asset")["sha256"]

    for got in (seen["cells"], seen["untyped"][0]):
        assert isinstance(got, ad.AnnData) and got is not cells
        assert sp.issparse(got.X) and (got.X != cells.X).nnz == 0
        assert list(got.obs_names) == list(cells.obs_names)
        assert got.obs[schema.CELL_TYPE].tolist() == cells.obs[schema.CELL_TYPE].tolist()
        np.testing.assert_array_equal(got.obsm[schema.SPATIAL_OBSM], cells.obsm[schema.SPATIAL_OBSM])
        assert (got.layers[schema.COUNTS_LAYER] != cells.layers[schema.COUNTS_LAYER]).nnz == 0
        assert got.uns[schema.PROVENANCE_UNS]["seed"] == 0
    for got in (seen["table"], seen["untyped"][1]):
        pd.testing.assert_frame_equal(got, table)
    for got in (seen["summary"], seen["untyped"][2]):
        assert got == {"n": 3, "labels": ["a", "b"], "nested": {"f": 1.5}, "np": 7}
    X = np.random.default_rng(5).normal(size=(10, 8)).astype(np.float32)
    for got in (seen["model"], seen["untyped"][3]):
        assert isinstance(got, TrainedModel)
        assert got.classes == model.classes and got.genes == model.genes
        assert got.card["classes"] == ["A", "B", "C"]
        np.testing.assert_allclose(
            got.classifier.predict_proba(got.scaler.transform(X)), model.classifier.predict_proba(model.scaler.transform(X))
        )


def test_same_value_same_bytes(io_manager: ObjectStoreIOManager) -> None:
    """JSON is written with sorted keys, so sha256 identifies the value (change detection downstream)."""

    @dg.asset
    def d() -> dict:
        return {"b": 1, "a": [1, 2]}

    first = _meta(dg.materialize([d], resources={"io_manager": io_manager}), "d")["sha256"]

    @dg.asset(name="d")
    def d2() -> dict:
        return {"a": [1, 2], "b": 1}

    assert _meta(dg.materialize([d2], resources={"io_manager": io_manager}), "d")["sha256"] == first


samples = dg.StaticPartitionsDefinition(["s1", "s2", "s3"])


def test_partitioned_paths_single_and_all_partition_loads(io_manager: ObjectStoreIOManager) -> None:
    seen: dict[str, Any] = {}

    @dg.asset(partitions_def=samples)
    def sample_cells(context: dg.AssetExecutionContext) -> ad.AnnData:
        i = int(context.partition_key[1:])
        return _adata(n_obs=10 * i, seed=i)

    @dg.asset(partitions_def=samples)
    def per_sample(context: dg.AssetExecutionContext, sample_cells: ad.AnnData) -> dict:
        seen[context.partition_key] = sample_cells.n_obs
        return {"n_obs": sample_cells.n_obs}

    @dg.asset
    def all_samples(sample_cells: dict[str, ad.AnnData]) -> dict:
        seen["all"] = {k: v.n_obs for k, v in sample_cells.items()}
        return seen["all"]

    @dg.asset
    def all_summaries(per_sample) -> dict:  # noqa: ANN001 - untyped: dict of partition → probed format
        seen["summaries"] = per_sample
        return {}

    for pk in ["s1", "s2", "s3"]:
        r = dg.materialize([sample_cells, per_sample], partition_key=pk, resources={"io_manager": io_manager})
        assert _meta(r, "sample_cells")["n_obs"] == 10 * int(pk[1:])
    store = io_manager.get_store()
    assert [i.key for i in store.list("assets/sample_cells/")] == [f"assets/sample_cells/s{i}.h5ad" for i in (1, 2, 3)]
    assert seen == {"s1": 10, "s2": 20, "s3": 30}  # partitioned downstream: the single object

    dg.materialize(
        [sample_cells.to_source_asset(), per_sample.to_source_asset(), all_samples, all_summaries],
        resources={"io_manager": io_manager},
    )
    assert seen["all"] == {"s1": 10, "s2": 20, "s3": 30}  # unpartitioned downstream: partition → object
    assert seen["summaries"] == {"s1": {"n_obs": 10}, "s2": {"n_obs": 20}, "s3": {"n_obs": 30}}


def test_missing_partitions_fail_unless_allowed(io_manager: ObjectStoreIOManager) -> None:
    @dg.asset(partitions_def=samples)
    def part(context: dg.AssetExecutionContext) -> dict:
        return {"k": context.partition_key}

    seen: dict[str, Any] = {}

    @dg.asset(ins={"part": dg.AssetIn(metadata={"allow_missing_partitions": True})})
    def tolerant(part: dict[str, dict]) -> None:
        seen.update(part)

    @dg.asset
    def strict(part: dict[str, dict]) -> None:
        seen["strict"] = part

    dg.materialize([part], partition_key="s2", resources={"io_manager": io_manager})
    src = part.to_source_asset()
    dg.materialize([src, tolerant], resources={"io_manager": io_manager})
    assert seen == {"s2": {"k": "s2"}}
    with pytest.raises(FileNotFoundError, match="s1"):
        dg.materialize([src, strict], resources={"io_manager": io_manager})


def test_multi_partition_path(io_manager: ObjectStoreIOManager) -> None:
    mp = dg.MultiPartitionsDefinition(
        {"sample": dg.StaticPartitionsDefinition(["s1"]), "reference": dg.StaticPartitionsDefinition(["ref-a"])}
    )

    @dg.asset(partitions_def=mp)
    def typed(context: dg.AssetExecutionContext) -> pd.DataFrame:
        return pd.DataFrame({"p": [str(context.partition_key)]})

    dg.materialize([typed], partition_key=dg.MultiPartitionKey({"sample": "s1", "reference": "ref-a"}), resources={"io_manager": io_manager})
    # dimension values in dimension-name order (reference < sample), as UPathIOManager does
    assert [i.key for i in io_manager.get_store().list("assets/")] == ["assets/typed/ref-a/s1.parquet"]


def test_unsafe_partition_key_is_refused(io_manager: ObjectStoreIOManager) -> None:
    bad = dg.StaticPartitionsDefinition(["ok", "has space"])

    @dg.asset(partitions_def=bad)
    def p() -> dict:
        return {}

    with pytest.raises(InvalidIdError, match="has space"):
        dg.materialize([p], partition_key="has space", resources={"io_manager": io_manager})
    assert io_manager.get_store().list() == []


def test_failed_serialisation_leaves_previous_version_and_no_partial_object(io_manager: ObjectStoreIOManager) -> None:
    @dg.asset(name="table")
    def good() -> pd.DataFrame:
        return pd.DataFrame({"a": [1, 2]})

    @dg.asset(name="table")
    def bad() -> pd.DataFrame:
        return pd.DataFrame({"a": [1, "two"]})  # a mixed int/str column has no parquet type

    @dg.asset
    def cells() -> ad.AnnData:
        a = _adata()
        a.uns["unwritable"] = object()  # h5ad cannot store an arbitrary object
        return a

    r = dg.materialize([good], resources={"io_manager": io_manager})
    sha = _meta(r, "table")["sha256"]
    store = io_manager.get_store()
    with pytest.raises(SerializationError, match="table.*parquet"):
        dg.materialize([bad], resources={"io_manager": io_manager})
    assert _sha(store.read_bytes("assets/table.parquet")) == sha  # old version intact
    with pytest.raises(SerializationError, match="cells.*h5ad"):
        dg.materialize([cells], resources={"io_manager": io_manager})
    assert [i.key for i in store.list()] == ["assets/table.parquet"]  # nothing partial, no temp objects


def test_unsupported_value_is_refused(io_manager: ObjectStoreIOManager) -> None:
    @dg.asset
    def weird() -> Any:
        return {1, 2, 3}

    with pytest.raises(UnsupportedValueError, match="weird.*set"):
        dg.materialize([weird], resources={"io_manager": io_manager})


def test_tampered_or_cardless_model_is_refused(io_manager: ObjectStoreIOManager, model: TrainedModel) -> None:
    @dg.asset
    def clf() -> TrainedModel:
        return model

    @dg.asset
    def use(clf: TrainedModel) -> None:
        pass

    dg.materialize([clf], resources={"io_manager": io_manager})
    store = io_manager.get_store()
    original = store.read_bytes("assets/clf.pkl")
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    store.write_bytes("assets/clf.pkl", bytes(tampered))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        dg.materialize([clf.to_source_asset(), use], resources={"io_manager": io_manager})
    store.write_bytes("assets/clf.pkl", original)
    dg.materialize([clf.to_source_asset(), use], resources={"io_manager": io_manager})  # restored: loads
    store.delete("assets/clf.pkl.card.json")
    with pytest.raises(ModelCardError, match="no card"):
        dg.materialize([clf.to_source_asset(), use], resources={"io_manager": io_manager})


def test_io_manager_contexts_directly(io_manager: ObjectStoreIOManager) -> None:
    """Outside a run (build_output_context / build_input_context), as asset checks and scripts use it."""
    out = dg.build_output_context(asset_key=dg.AssetKey(["reports", "qc"]))
    io_manager.handle_output(out, {"ok": True})
    assert io_manager.get_store().exists("assets/reports/qc.json")
    probed = dg.build_input_context(asset_key=dg.AssetKey(["reports", "qc"]))  # no type: format probed
    assert io_manager.load_input(probed) == {"ok": True}
    declared = dg.build_input_context(asset_key=dg.AssetKey(["reports", "qc"]), definition_metadata={"format": "json"})
    assert io_manager.load_input(declared) == {"ok": True}
    wrong = dg.build_input_context(asset_key=dg.AssetKey(["reports", "qc"]), definition_metadata={"format": "parquet"})
    with pytest.raises(FileNotFoundError, match="qc.parquet"):
        io_manager.load_input(wrong)
    bogus = dg.build_input_context(asset_key=dg.AssetKey(["reports", "qc"]), definition_metadata={"format": "xlsx"})
    with pytest.raises(UnsupportedValueError, match="xlsx"):
        io_manager.load_input(bogus)


def test_storage_resource_kinds(tmp_path: Path, s3_settings: S3Settings, s3_bucket: str) -> None:
    local = StorageResource(kind="local", root=str(tmp_path / "files"), prefix="p")
    local.get_store().write_bytes("a.txt", b"1")
    assert (tmp_path / "files" / "p" / "a.txt").read_bytes() == b"1"
    assert local.s3_settings() is None
    s3 = StorageResource(
        kind="s3",
        bucket=s3_bucket,
        prefix="p",
        endpoint_url=s3_settings.endpoint_url,
        aws_access_key_id=s3_settings.access_key_id,
        aws_secret_access_key=s3_settings.secret_access_key,
        cache_dir=str(tmp_path / "cache"),
    )
    s3.get_store().write_bytes("a.txt", b"2")
    assert s3_settings.client().get_object(Bucket=s3_bucket, Key="p/a.txt")["Body"].read() == b"2"
    assert s3.s3_settings().endpoint_url == s3_settings.endpoint_url
    with pytest.raises(StorageConfigError, match="kind"):
        StorageResource(kind="gcs").get_store()


def test_build_resources_s3_by_environment_alone(
    s3_env: S3Settings, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The 'AWS' deployment pointed at SeaweedFS purely through env vars: what runs on AWS runs here."""
    monkeypatch.setenv("SPATIAL_ASSETS_BUCKET", s3_bucket)
    monkeypatch.setenv("SPATIAL_ASSETS_PREFIX", "prod")
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    resources = build_resources("s3")
    assert set(resources) == {"storage", "io_manager"}

    @dg.asset
    def env_asset(storage: StorageResource) -> dict:
        storage.get_store().write_bytes("landing/x.txt", b"raw")
        return {"via": "env"}

    dg.materialize([env_asset], resources=resources)
    keys = sorted(o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == ["prod/assets/env_asset.json", "prod/landing/x.txt"]
    # secrets are passed as EnvVar references, not copied into the (UI-visible) config
    assert isinstance(resources["io_manager"].aws_secret_access_key, dg.EnvVar)
    assert isinstance(resources["storage"].aws_secret_access_key, dg.EnvVar)
    monkeypatch.delenv("SPATIAL_ASSETS_BUCKET")
    with pytest.raises(StorageConfigError, match="SPATIAL_ASSETS_BUCKET"):
        build_resources("s3")
    with pytest.raises(StorageConfigError, match="nowhere"):
        build_resources("nowhere")


def test_build_resources_local_and_local_s3_are_lazy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from spatial_assets.storage.seaweed import STATE_FILE, stop_running

    home = tmp_path / "home"
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(home))
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPATIAL_ASSETS_DEPLOYMENT", raising=False)

    @dg.asset
    def lazy_asset() -> dict:
        return {"x": 1}

    local = build_resources("local")
    dg.materialize([lazy_asset], resources=local)
    assert json.loads((home / "storage" / "assets" / "lazy_asset.json").read_text()) == {"x": 1}

    resources = build_resources()  # default deployment: local_s3
    assert isinstance(resources["io_manager"], S3ObjectStoreIOManager)
    assert not (home / "s3" / STATE_FILE).exists()  # building the resources started nothing
    try:
        dg.materialize([lazy_asset], resources=resources)
        assert (home / "s3" / STATE_FILE).exists()  # started on first use
        pid = json.loads((home / "s3" / STATE_FILE).read_text())["pid"]
        dg.materialize([lazy_asset], resources=build_resources())  # a later run reuses the same server
        assert json.loads((home / "s3" / STATE_FILE).read_text())["pid"] == pid
        store = resources["storage"].get_store()
        assert json.loads(store.read_bytes("assets/lazy_asset.json")) == {"x": 1}
    finally:
        stop_running(home / "s3", graceful=False)


def test_read_format_from_declared_type(tmp_path: Path) -> None:
    from collections.abc import Mapping
    from typing import Optional

    io = LocalObjectStoreIOManager(root=str(tmp_path))
    cases = [
        (ad.AnnData, False, "h5ad"),
        (Optional[ad.AnnData], False, "h5ad"),
        (pd.DataFrame | None, False, "parquet"),
        (TrainedModel, False, "model"),
        (dict, False, "json"),
        (list[str], False, "json"),
        (dict[str, pd.DataFrame], False, "json"),  # unpartitioned upstream: the dict IS the value
        (dict[str, pd.DataFrame], True, "parquet"),  # partitioned upstream: {partition: DataFrame}
        (Mapping[str, TrainedModel], True, "model"),
        (dict, True, None),  # value type unknown: probe the store
        (Any, False, None),
        (int, False, None),
    ]
    for tp, partitions, expected in cases:
        assert io._format_for_type(tp, partitions=partitions) == expected, (tp, partitions)
