"""IO managers (UPathIOManager subclasses): every format through Dagster, on a directory and on the real SeaweedFS S3."""

import base64
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import anndata as ad
import dagster as dg
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.celltyping.training import ModelIntegrityError, TrainedModel, train_model
from spatial_assets.core import schema
from spatial_assets.core.ids import InvalidIdError
from spatial_assets.defs.io_managers import (
    AssetIOManager,
    LocalAssetIOManager,
    ModelCardError,
    S3AssetIOManager,
    SerializationError,
    UnsupportedValueError,
    format_for_type,
)
from spatial_assets.defs.plots import THUMBNAIL_WIDTH, WithFigures, render_figures
from spatial_assets.domains.engine import DomainModel, get_engine
from spatial_assets.domains.synthetic import make_synthetic_tissue, split_samples
from spatial_assets.storage.objectstore import TRANSFER_PART_SIZE, S3Settings

IOFactory = Any  # LocalAssetIOManager | S3AssetIOManager


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


@pytest.fixture(scope="module")
def tissue() -> ad.AnnData:
    return split_samples(make_synthetic_tissue(800, n_domains=3, n_samples=1, n_genes=40, n_cell_types=5, seed=2))[0]


@pytest.fixture(scope="module")
def domain_model(tissue: ad.AnnData) -> DomainModel:
    return get_engine("neighborhood").fit([tissue], levels=[3], n_domains=3, seed=0)


@pytest.fixture(params=["local", "s3"])
def io_manager(request: pytest.FixtureRequest, tmp_path: Path) -> IOFactory:
    if request.param == "local":
        return LocalAssetIOManager(base_dir=str(tmp_path / "root" / "assets"))
    return S3AssetIOManager(
        s3_resource=request.getfixturevalue("s3_resource"),
        s3_bucket=request.getfixturevalue("s3_bucket"),
        s3_prefix="p/assets",
        cache_dir=str(tmp_path / "cache"),
    )


def _meta(result: dg.ExecuteInProcessResult, asset: str | list[str]) -> dict[str, Any]:
    key = dg.AssetKey(asset if isinstance(asset, list) else [asset])
    mats = [e.materialization for e in result.get_asset_materialization_events() if e.asset_key == key]
    assert len(mats) == 1, key
    return {k: getattr(v, "value", v) for k, v in mats[0].metadata.items()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _keys(io_manager: IOFactory) -> list[str]:
    return [i.key for i in io_manager.get_store().list()]


def test_is_a_upath_io_manager(io_manager: IOFactory) -> None:
    inner = io_manager.create_io_manager(None)
    assert isinstance(inner, dg.UPathIOManager) and isinstance(inner, AssetIOManager)
    assert str(inner._base_path) == io_manager.get_store().uri("x")[: -len("/x")]


def test_all_formats_round_trip(io_manager: IOFactory, model: TrainedModel, domain_model: DomainModel, tissue: ad.AnnData) -> None:
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

    @dg.asset
    def domains_asset() -> DomainModel:
        return domain_model

    ins = {"cells_asset": dg.AssetIn(key=["celltyping", "cells_asset"])}

    @dg.asset(ins=ins)
    def consumer(cells_asset: ad.AnnData, table_asset: pd.DataFrame, summary_asset: dict, model_asset: TrainedModel,
                 domains_asset: DomainModel) -> None:
        seen.update(cells=cells_asset, table=table_asset, summary=summary_asset, model=model_asset, domains=domains_asset)

    @dg.asset(ins=ins)
    def untyped_consumer(cells_asset, table_asset, summary_asset, model_asset, domains_asset) -> None:  # noqa: ANN001
        # no input types: the format comes from each upstream asset's declared return type
        seen.update(untyped=(cells_asset, table_asset, summary_asset, model_asset, domains_asset))

    result = dg.materialize(
        [cells_asset, table_asset, summary_asset, model_asset, domains_asset, consumer, untyped_consumer],
        resources={"io_manager": io_manager},
    )
    assert result.success
    store = io_manager.get_store()
    assert _keys(io_manager) == [
        "celltyping/cells_asset.h5ad",
        "domains_asset.zip",
        "domains_asset.zip.card.json",
        "model_asset.pkl",
        "model_asset.pkl.card.json",
        "summary_asset.json",
        "table_asset.parquet",
    ]
    # metadata: sha256 and size of the bytes actually stored, computed here independently
    for asset, key in [
        (["celltyping", "cells_asset"], "celltyping/cells_asset.h5ad"),
        ("table_asset", "table_asset.parquet"),
        ("summary_asset", "summary_asset.json"),
        ("model_asset", "model_asset.pkl"),
        ("domains_asset", "domains_asset.zip"),
    ]:
        meta = _meta(result, asset)
        data = store.read_bytes(key)
        assert meta["sha256"] == _sha(data), asset
        assert meta["size_bytes"] == len(data), asset
        assert meta["uri"] == store.uri(key) == meta["path"], asset
    m = _meta(result, ["celltyping", "cells_asset"])
    assert (m["n_obs"], m["n_vars"], m["format"]) == (40, 12, "h5ad")
    assert (_meta(result, "table_asset")["n_rows"], _meta(result, "table_asset")["n_cols"]) == (3, 2)
    for asset, ext in (("model_asset", "pkl"), ("domains_asset", "zip")):
        card = json.loads(store.read_bytes(f"{asset}.{ext}.card.json"))
        assert card["sha256"] == _meta(result, asset)["sha256"]
        assert _meta(result, asset)["card_uri"] == store.uri(f"{asset}.{ext}.card.json")

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
    expected = domain_model.assign(tissue).obs["domain"].astype(str).tolist()
    for got in (seen["domains"], seen["untyped"][4]):
        assert isinstance(got, DomainModel) and got is not domain_model
        assert got.sha256 == _meta(result, "domains_asset")["sha256"]
        assert got.assign(tissue).obs["domain"].astype(str).tolist() == expected  # same model, same calls


def test_same_value_same_bytes(io_manager: IOFactory) -> None:
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


def test_partitioned_paths_single_and_all_partition_loads(io_manager: IOFactory) -> None:
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

    @dg.asset(ins={"per_sample": dg.AssetIn(metadata={"format": "json"})})
    def all_summaries(per_sample) -> dict:  # noqa: ANN001 - untyped input of a source asset: format from input metadata
        seen["summaries"] = per_sample
        return {}

    for pk in ["s1", "s2", "s3"]:
        r = dg.materialize([sample_cells, per_sample], partition_key=pk, resources={"io_manager": io_manager})
        assert _meta(r, "sample_cells")["n_obs"] == 10 * int(pk[1:])
    assert [k for k in _keys(io_manager) if k.startswith("sample_cells/")] == [f"sample_cells/s{i}.h5ad" for i in (1, 2, 3)]
    assert seen == {"s1": 10, "s2": 20, "s3": 30}  # partitioned downstream: the single object

    dg.materialize(
        [sample_cells.to_source_asset(), per_sample.to_source_asset(), all_samples, all_summaries],
        resources={"io_manager": io_manager},
    )
    assert seen["all"] == {"s1": 10, "s2": 20, "s3": 30}  # unpartitioned downstream: partition → object
    assert seen["summaries"] == {"s1": {"n_obs": 10}, "s2": {"n_obs": 20}, "s3": {"n_obs": 30}}


def test_one_partition_is_a_mapping_for_an_unpartitioned_consumer(io_manager: IOFactory) -> None:
    """One registered reference must still reach ``training_set`` as {partition: record}."""
    one = dg.StaticPartitionsDefinition(["only"])

    @dg.asset(partitions_def=one)
    def record() -> dict:
        return {"id": "only"}

    seen: dict[str, Any] = {}

    @dg.asset(ins={"record": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())})
    def combined(record: dict) -> dict:
        seen.update(record)
        return {}

    with dg.instance_for_test() as instance:
        dg.materialize([record], partition_key="only", resources={"io_manager": io_manager}, instance=instance)
        # `record` is not in this run: its format comes from what its materialization recorded
        dg.materialize([record, combined], selection=[combined], resources={"io_manager": io_manager}, instance=instance)
    assert seen == {"only": {"id": "only"}}


def test_missing_partitions_fail_unless_allowed(io_manager: IOFactory) -> None:
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
    with pytest.raises(FileNotFoundError, match="s1.json"):
        dg.materialize([src, strict], resources={"io_manager": io_manager})


def test_multi_partition_paths_and_loads(io_manager: IOFactory) -> None:
    mp = dg.MultiPartitionsDefinition(
        {"sample": dg.StaticPartitionsDefinition(["s1", "s2"]), "reference": dg.StaticPartitionsDefinition(["ref-a"])}
    )

    @dg.asset(partitions_def=mp)
    def typed(context: dg.AssetExecutionContext) -> pd.DataFrame:
        return pd.DataFrame({"p": [str(context.partition_key)]})

    seen: dict[str, Any] = {}

    @dg.asset
    def gathered(typed: dict[str, pd.DataFrame]) -> None:
        seen.update({str(k): v["p"].iloc[0] for k, v in typed.items()})

    for s in ("s1", "s2"):
        dg.materialize([typed], partition_key=dg.MultiPartitionKey({"sample": s, "reference": "ref-a"}), resources={"io_manager": io_manager})
    # dimension values in dimension-name order (reference < sample), as UPathIOManager does
    assert _keys(io_manager) == ["typed/ref-a/s1.parquet", "typed/ref-a/s2.parquet"]
    dg.materialize([typed.to_source_asset(), gathered], resources={"io_manager": io_manager})
    assert seen == {"ref-a|s1": "ref-a|s1", "ref-a|s2": "ref-a|s2"}


def test_unsafe_partition_key_is_refused(io_manager: IOFactory) -> None:
    bad = dg.StaticPartitionsDefinition(["ok", "has space"])

    @dg.asset(partitions_def=bad)
    def p() -> dict:
        return {}

    with pytest.raises(InvalidIdError, match="has space"):
        dg.materialize([p], partition_key="has space", resources={"io_manager": io_manager})
    assert _keys(io_manager) == []


def test_failed_serialisation_leaves_previous_version_and_no_partial_object(io_manager: IOFactory) -> None:
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

    @dg.asset
    def summary() -> dict:
        return {"x": object()}  # not JSON

    r = dg.materialize([good], resources={"io_manager": io_manager})
    sha = _meta(r, "table")["sha256"]
    store = io_manager.get_store()
    with pytest.raises(SerializationError, match="table.*parquet"):
        dg.materialize([bad], resources={"io_manager": io_manager})
    assert _sha(store.read_bytes("table.parquet")) == sha  # old version intact
    with pytest.raises(SerializationError, match="cells.*h5ad"):
        dg.materialize([cells], resources={"io_manager": io_manager})
    with pytest.raises(SerializationError, match="summary.*json"):
        dg.materialize([summary], resources={"io_manager": io_manager})
    assert _keys(io_manager) == ["table.parquet"]  # nothing partial, no temp objects
    if isinstance(io_manager, LocalAssetIOManager):
        leftovers = [p.name for p in Path(io_manager.base_dir).rglob("*") if p.name.startswith(".")]
        assert leftovers == []  # no temp files or staging dirs either


def _cut_after_parts(client: Any, n_ok: int) -> list[int]:
    """Make every UploadPart after the first ``n_ok`` fail as a dropped connection would (a real
    request hook on the real client: nothing else is replaced)."""
    parts: list[int] = []

    def cut(**kwargs: Any) -> None:
        parts.append(1)
        if len(parts) > n_ok:
            raise ConnectionError("network cut during part upload")

    client.meta.events.register("before-call.s3.UploadPart", cut, unique_id="test-cut-connection")
    return parts


def test_failed_upload_leaves_nothing_and_no_multipart_upload(s3_resource: Any, s3_bucket: str, s3_settings: S3Settings, tmp_path: Path) -> None:
    io_manager = S3AssetIOManager(s3_resource=s3_resource, s3_bucket=s3_bucket, s3_prefix="assets", cache_dir=str(tmp_path / "c"))
    rng = np.random.default_rng(0)
    n = TRANSFER_PART_SIZE // 8 * 3  # three parts of float64 noise (parquet cannot shrink it)

    @dg.asset
    def big_cells() -> ad.AnnData:
        return ad.AnnData(X=rng.normal(size=(n // 100, 100)))

    @dg.asset
    def big_table() -> pd.DataFrame:
        return pd.DataFrame({"x": rng.normal(size=n)})

    client = io_manager.get_store().client
    try:
        for asset in (big_cells, big_table):  # h5ad: staged file + transfer manager; parquet: streamed parts
            parts = _cut_after_parts(client, n_ok=1)
            with pytest.raises(Exception, match="network cut"):
                dg.materialize([asset], resources={"io_manager": io_manager})
            assert len(parts) >= 2, asset  # it really was a multipart upload, cut after its first part
            client.meta.events.unregister("before-call.s3.UploadPart", unique_id="test-cut-connection")
    finally:
        client.meta.events.unregister("before-call.s3.UploadPart", unique_id="test-cut-connection")
    raw = s3_settings.client()
    assert raw.list_objects_v2(Bucket=s3_bucket).get("Contents", []) == []
    assert raw.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []  # aborted: no orphaned parts
    r = dg.materialize([big_table], resources={"io_manager": io_manager})  # the connection is back: it works
    stored = io_manager.get_store().info("big_table.parquet")
    n_parts = -(-stored.size // TRANSFER_PART_SIZE)
    assert n_parts >= 3 and stored.etag.endswith(f"-{n_parts}")  # streamed in parts
    assert _meta(r, "big_table")["size_bytes"] == stored.size
    assert _meta(r, "big_table")["sha256"] == _sha(io_manager.get_store().read_bytes("big_table.parquet"))


def test_unsupported_value_is_refused(io_manager: IOFactory) -> None:
    @dg.asset
    def weird() -> Any:
        return {1, 2, 3}

    with pytest.raises(UnsupportedValueError, match="weird.*set"):
        dg.materialize([weird], resources={"io_manager": io_manager})

    @dg.asset(metadata={"format": "parquet"})
    def mislabelled() -> dict:
        return {"a": 1}

    with pytest.raises(UnsupportedValueError, match="mislabelled.*'parquet'.*json"):
        dg.materialize([mislabelled], resources={"io_manager": io_manager})
    assert _keys(io_manager) == []


def test_tampered_or_cardless_model_is_refused(io_manager: IOFactory, model: TrainedModel, domain_model: DomainModel) -> None:
    @dg.asset
    def clf() -> TrainedModel:
        return model

    @dg.asset
    def dom() -> DomainModel:
        return domain_model

    @dg.asset
    def use(clf: TrainedModel) -> None:
        pass

    @dg.asset
    def use_dom(dom: DomainModel) -> None:
        pass

    instance = dg.DagsterInstance.ephemeral()  # the sha256 a model must match is this instance's record of the write
    dg.materialize([clf, dom], resources={"io_manager": io_manager}, instance=instance)
    store = io_manager.get_store()
    for key, consumer, error in (("clf.pkl", use, ModelIntegrityError), ("dom.zip", use_dom, ValueError)):
        upstream = clf if consumer is use else dom
        original = store.read_bytes(key)
        tampered = bytearray(original)
        tampered[len(tampered) // 2] ^= 0xFF
        store.write_bytes(key, bytes(tampered))
        with pytest.raises(error, match="sha256"):
            dg.materialize([upstream.to_source_asset(), consumer], resources={"io_manager": io_manager}, instance=instance)
        store.write_bytes(key, original)
        dg.materialize([upstream.to_source_asset(), consumer], resources={"io_manager": io_manager}, instance=instance)  # restored
        store.delete(key + ".card.json")
        with pytest.raises(ModelCardError, match="no card"):
            dg.materialize([upstream.to_source_asset(), consumer], resources={"io_manager": io_manager}, instance=instance)


def test_io_manager_contexts_directly(io_manager: IOFactory) -> None:
    """Outside a run (build_output_context / build_input_context), as scripts and benchmarks use it."""
    inner = io_manager.create_io_manager(None)
    out = dg.build_output_context(asset_key=dg.AssetKey(["reports", "qc"]))
    inner.handle_output(out, {"ok": True})
    assert io_manager.get_store().exists("reports/qc.json")
    assert out.get_logged_metadata()["uri"].value == io_manager.get_store().uri("reports/qc.json")
    declared = dg.build_input_context(asset_key=dg.AssetKey(["reports", "qc"]), definition_metadata={"format": "json"})
    assert inner.load_input(declared) == {"ok": True}
    undeclared = dg.build_input_context(asset_key=dg.AssetKey(["reports", "qc"]))  # no type, no metadata: no guessing
    with pytest.raises(UnsupportedValueError, match="cannot tell the storage format of asset 'reports/qc'.*format"):
        inner.load_input(undeclared)
    wrong = dg.build_input_context(asset_key=dg.AssetKey(["reports", "qc"]), definition_metadata={"format": "parquet"})
    with pytest.raises(FileNotFoundError, match="qc.parquet"):
        inner.load_input(wrong)
    bogus = dg.build_input_context(asset_key=dg.AssetKey(["reports", "qc"]), definition_metadata={"format": "xlsx"})
    with pytest.raises(UnsupportedValueError, match="xlsx"):
        inner.load_input(bogus)


def _png(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)  # a smooth gradient with a little noise: compresses like a plot
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
    pixels = (ramp + rng.integers(0, 5, size=(height, width, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_figures_are_stored_beside_the_value_with_thumbnails(io_manager: IOFactory) -> None:
    from PIL import Image

    wide, narrow = _png(1800, 900, 1), _png(300, 200, 2)

    @dg.asset(partitions_def=samples)
    def plotted(context: dg.AssetExecutionContext) -> WithFigures:
        return WithFigures(_adata(), {"umap": wide, "qc": narrow})

    seen: dict[str, Any] = {}

    @dg.asset(partitions_def=samples)
    def after(plotted: ad.AnnData) -> None:
        seen["value"] = plotted  # the consumer gets the value, not the wrapper

    r = dg.materialize([plotted, after], partition_key="s1", resources={"io_manager": io_manager})
    store = io_manager.get_store()
    assert _keys(io_manager) == ["plotted/s1.h5ad", "plotted/s1.plots/qc.png", "plotted/s1.plots/umap.png"]
    assert store.read_bytes("plotted/s1.plots/umap.png") == wide  # the full-size figure
    assert isinstance(seen["value"], ad.AnnData) and seen["value"].n_obs == 40
    meta = _meta(r, "plotted")
    for name, full_width in (("umap", 1800), ("qc", 300)):
        text = meta[f"plot_{name}"]
        assert store.uri(f"plotted/s1.plots/{name}.png") in text
        thumb = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text).group(1))
        with Image.open(io.BytesIO(thumb)) as img:
            assert img.width == min(full_width, THUMBNAIL_WIDTH)
            assert abs(img.width / img.height - full_width / {1800: 900, 300: 200}[full_width]) < 0.01
    assert len(meta["plot_umap"]) < len(base64.b64encode(wide))  # the thumbnail, not the full image, is inline


def test_plots_never_fail_the_asset(io_manager: IOFactory) -> None:
    class Log:
        def __init__(self) -> None:
            self.warnings: list[str] = []

        def warning(self, msg: str) -> None:
            self.warnings.append(msg)

    log = Log()

    def broken(out_dir: Path) -> dict:
        raise RuntimeError("matplotlib exploded")

    assert render_figures(broken, log) == {}
    assert "matplotlib exploded" in log.warnings[0]

    @dg.asset
    def unplottable() -> WithFigures:
        return WithFigures({"v": 1}, {"bad/../name": b"png"})  # a figure name that is no valid key

    r = dg.materialize([unplottable], resources={"io_manager": io_manager})
    assert r.success and _keys(io_manager) == ["unplottable.json"]
    assert not any(k.startswith("plot_") for k in _meta(r, "unplottable"))


def test_read_format_from_declared_type() -> None:
    from collections.abc import Mapping
    from typing import Optional

    cases = [
        (ad.AnnData, False, "h5ad"),
        (Optional[ad.AnnData], False, "h5ad"),
        (pd.DataFrame | None, False, "parquet"),
        (TrainedModel, False, "model"),
        (DomainModel, False, "domain_model"),
        (dict, False, "json"),
        (list[str], False, "json"),
        (dict[str, pd.DataFrame], False, "json"),  # unpartitioned upstream: the dict IS the value
        (dict[str, pd.DataFrame], True, "parquet"),  # partitioned upstream: {partition: DataFrame}
        (Mapping[str, TrainedModel], True, "model"),
        (dict, True, None),  # value type unknown: the upstream's declaration decides
        (WithFigures, False, None),
        (Any, False, None),
        (int, False, None),
    ]
    for tp, partitions, expected in cases:
        assert format_for_type(tp, partitions=partitions) == expected, (tp, partitions)


class _Payload:
    """A pickle that, when unpickled, creates ``marker`` (what an attacker's code would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_forged_model_with_its_own_card_is_refused_before_unpickling(io_manager: IOFactory, model: TrainedModel, tmp_path: Path) -> None:
    import hashlib
    import json
    import pickle

    @dg.asset
    def clf() -> TrainedModel:
        return model

    @dg.asset
    def use(clf: TrainedModel) -> None:
        pass

    instance = dg.DagsterInstance.ephemeral()
    dg.materialize([clf], resources={"io_manager": io_manager}, instance=instance)
    store = io_manager.get_store()
    marker = tmp_path / "payload_ran"
    evil = pickle.dumps(_Payload(marker))
    card = json.loads(store.read_bytes("clf.pkl.card.json"))
    store.write_bytes("clf.pkl", evil)
    store.write_bytes("clf.pkl.card.json", json.dumps({**card, "sha256": hashlib.sha256(evil).hexdigest()}).encode())
    with pytest.raises(ModelIntegrityError, match="card says sha256 .* Dagster instance recorded .* refusing"):
        dg.materialize([clf.to_source_asset(), use], resources={"io_manager": io_manager}, instance=instance)
    assert not marker.exists()
    # a model the instance has no record of (written outside the platform) is refused too
    with pytest.raises(ModelIntegrityError, match="no materialization of clf recording its sha256"):
        dg.materialize([clf.to_source_asset(), use], resources={"io_manager": io_manager}, instance=dg.DagsterInstance.ephemeral())
    assert not marker.exists()
    pickle.loads(evil)  # the payload is real: unpickled, it does run
    assert marker.exists()
