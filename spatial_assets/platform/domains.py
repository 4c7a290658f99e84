"""Domain stages as the platform runs them (no Dagster): one shared model, applied per sample.

The model is fitted once on the samples registered at the time and stored as a zip of its
npz + json files with a sha256; every later sample is *assigned* with that model, so its domain
ids mean the same as the earlier samples' without recomputing them.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import pandas as pd

from spatial_assets.domains.engine import DEFAULT_ENGINE, get_engine, load_model, normalize_levels
from spatial_assets.storage.objectstore import sha256_file


def default_levels(n_domains: int) -> list[int]:
    """A small resolution range around the requested number of domains (coarser and finer)."""
    return [max(2, n_domains - 2), n_domains, n_domains + 3]


def fit_domain_model(
    samples: Sequence[ad.AnnData],
    *,
    engine: str = "",
    n_domains: int,
    levels: Sequence[int] = (),
    seed: int = 0,
    engine_config: dict[str, Any] | None = None,
):
    name = engine or DEFAULT_ENGINE
    lv = normalize_levels(list(levels) or default_levels(n_domains), n_domains)
    return get_engine(name, **(engine_config or {})).fit(list(samples), levels=lv, n_domains=n_domains, seed=seed)


def pack_model(model: Any, archive: Path) -> str:
    """Zip the model directory into ``archive`` (deterministic order) and return its sha256."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    info = zipfile.ZipInfo(str(path.relative_to(tmp)), date_time=(2000, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, path.read_bytes())
    return sha256_file(archive)


def unpack_model(archive: Path, expected_sha256: str):
    digest = sha256_file(archive)
    if digest != expected_sha256:
        raise ValueError(f"{archive}: domain model sha256 {digest} does not match the recorded {expected_sha256}")
    tmp = tempfile.mkdtemp(prefix="domain_model_")
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise ValueError(f"{archive}: unsafe member {name!r}")
            zf.extractall(tmp)
        return load_model(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: islands are patches separated from the rest by gaps wider than this many typical cell spacings
#: (measured: at 2x, 12 % of the MERFISH cells were "islands" — sparse tissue, not fragments; at 4x,
#: 1–7 cells per MERFISH/STARmap section)
ISLAND_RADIUS_FACTOR = 4.0


def mark_islands(adata: ad.AnnData, *, min_size: int, exclude: bool = False) -> ad.AnnData:
    """Flag cells in small disconnected patches in ``obs['is_island']`` (one sample).

    The graph joins cells closer than ``ISLAND_RADIUS_FACTOR`` × the median nearest-neighbour
    distance, so the rule is free of units and density.

    ``exclude=True`` also clears their domain at every level (NaN = the explicit "excluded island"
    marker the domain check accepts); otherwise they keep the domain the model gave them.
    """
    import numpy as np

    from spatial_assets.domains.graph import build_spatial_graph, flag_islands, median_nn_distance

    spacing = median_nn_distance(np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2])
    graphed = build_spatial_graph(adata, method="radius", radius=ISLAND_RADIUS_FACTOR * spacing)
    flagged = flag_islands(graphed, min_size=min_size)
    if exclude and flagged.obs["is_island"].any():
        island = flagged.obs["is_island"].to_numpy()
        for col in [c for c in flagged.obs.columns if c == "domain" or c.startswith("domain_level_")]:
            values = flagged.obs[col].copy()
            values[island] = None
            flagged.obs[col] = values
    return flagged


def annotate_domains_with_signatures(adata: ad.AnnData, signatures: str) -> tuple[ad.AnnData, pd.DataFrame]:
    """Domain-level cell-type calls by signature enrichment + elbow gap (bundled set or YAML path)."""
    from spatial_assets.domains.annotation import annotate_domains, bundled_signatures_path

    source = signatures if (signatures.endswith((".yaml", ".yml")) or "/" in signatures) else bundled_signatures_path(signatures)
    return annotate_domains(adata, source, domain_key="domain")



def spatially_variable_genes_table(adata: ad.AnnData, *, n_top: int = 2000, sample_key: str | None = None) -> pd.DataFrame:
    """Per-sample spatially variable genes as a parquet-friendly long table (one row per gene).

    Columns ``gene, moranI, pval_norm, qval, moranI_rank, spatially_variable`` (plain str/float/int/bool):
    Moran's I of every gene over the sample's spatial graph (``domains.svg.spatially_variable_genes``),
    the ``n_top`` highest flagged.
    """
    from spatial_assets.domains.svg import spatially_variable_genes

    table = spatially_variable_genes(adata, sample_key=sample_key, n_top=n_top, inplace=False)
    out = table.rename_axis("gene").reset_index()
    return out.astype({"gene": str, "moranI": float, "pval_norm": float, "qval": float, "moranI_rank": "int64", "spatially_variable": bool})
