"""The contract every tissue-domain engine follows, engine choice by name, and ``run_domains``.

Why a contract: domain ids must stay stable when new samples arrive. So an engine *fits* a model once
(on one or several samples) and the model *assigns* domains to any later sample without refitting,
and the model is saved as plain files (npz + json, never pickle: a pickle is code, not data).

Output written by ``DomainModel.assign`` (same for every engine):

- ``obs['domain_level_{k}']`` for every level ``k`` — string categorical, ids ``f"L{k}_D{i}"``;
- ``obs['domain']`` — a copy of the level that was passed as ``n_domains`` at fit time;
- ``obsm['X_domain_embedding']`` — the (n_obs, d) float32 embedding the domains were clustered on;
- ``uns['domains']`` — ``model.metadata()`` (engine, levels, parameters).

A saved model directory always holds ``domain_model.json`` with at least ``{"engine": <name>}`` so
``load_model(dir)`` can hand the directory to the right class.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from anndata import AnnData

from spatial_assets.core.schema import DOMAIN, SPATIAL_OBSM
from spatial_assets.core.spatial import checked_coordinates

DOMAIN_EMBEDDING_OBSM = "X_domain_embedding"
DOMAINS_UNS = "domains"
MODEL_JSON = "domain_model.json"

# name -> "module:Class"; imported only when asked for (Novae pulls in torch: slow and heavy)
ENGINES: dict[str, str] = {
    "neighborhood": "spatial_assets.domains.neighborhood:NeighborhoodDomainEngine",
    "novae": "spatial_assets.domains.novae.engine:NovaeDomainEngine",
}
# engines that need an optional extra: name -> (top-level modules they import, pip extra that brings them)
OPTIONAL_ENGINES: dict[str, tuple[tuple[str, ...], str]] = {"novae": (("torch", "novae"), "novae")}
# Measured on STARmap mPFC (benchmarks/bench_starmap_domains.py) and the synthetic benchmark: the
# neighbourhood engine wins offline; Novae trained from scratch collapses (see docs/domains.md).
DEFAULT_ENGINE = "neighborhood"


class DomainInputError(ValueError):
    """Input that cannot be given domains (no coordinates, NaN coordinates, too few cells, ...)."""


class EngineUnavailableError(DomainInputError):
    """The engine asked for needs an optional extra that is not installed (e.g. Novae and torch)."""


def level_key(k: int) -> str:
    """obs column holding the domains of level ``k``."""
    return f"domain_level_{int(k)}"


def domain_id(k: int, i: int) -> str:
    """Domain id ``i`` at level ``k`` (``L8_D3``): the level in the id keeps levels from colliding."""
    return f"L{int(k)}_D{int(i)}"


def domain_categorical(k: int, codes: np.ndarray) -> pd.Categorical:
    """String categorical with *all* ``k`` ids as categories, so every sample has identical categories."""
    cats = [domain_id(k, i) for i in range(int(k))]
    return pd.Categorical.from_codes(np.asarray(codes, dtype=np.int64), categories=cats)


def normalize_levels(levels: Sequence[int] | None, n_domains: int) -> list[int]:
    """Sorted unique levels, always containing ``n_domains``; refuses levels < 2."""
    if isinstance(n_domains, bool) or not isinstance(n_domains, (int, np.integer)):
        raise DomainInputError(f"n_domains must be an integer, got {n_domains!r}")
    out = {int(n_domains)}
    for k in levels or ():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise DomainInputError(f"levels must be integers, got {k!r}")
        out.add(int(k))
    bad = [k for k in out if k < 2]
    if bad:
        raise DomainInputError(f"every level / n_domains must be >= 2, got {sorted(bad)}")
    return sorted(out)


def sample_label(adata: AnnData, index: int) -> str:
    """A name for error messages: the file the AnnData came from if known, else its position."""
    src = adata.uns.get("source_path")
    if src:
        return str(src)
    fn = getattr(adata, "filename", None)
    return str(fn) if fn else f"input #{index}"


def validate_spatial(adata: AnnData, name: str = "input") -> np.ndarray:
    """Return the (n, 2+) float coordinates or raise :class:`DomainInputError` naming the problem."""
    if SPATIAL_OBSM not in adata.obsm:
        raise DomainInputError(f"{name}: obsm['{SPATIAL_OBSM}'] (spatial coordinates) is missing")
    return checked_coordinates(
        adata, adata.obsm[SPATIAL_OBSM], where=f"obsm['{SPATIAL_OBSM}']", source=name, error=DomainInputError
    )


def validate_sample_key(adata: AnnData, sample_key: str | None, name: str = "input") -> None:
    if sample_key is None:
        return
    if sample_key not in adata.obs.columns:
        raise DomainInputError(f"{name}: obs column {sample_key!r} (sample/batch key) is missing")
    if adata.obs[sample_key].isna().any():
        raise DomainInputError(f"{name}: obs column {sample_key!r} has missing values")


def fit_inputs(
    adatas: AnnData | Sequence[AnnData], levels: Sequence[int] | None, n_domains: int, *, who: str = "fit"
) -> tuple[list[AnnData], list[int], list[str]]:
    """The checks every engine's ``fit`` starts with: inputs as a list, levels, a name per input."""
    if isinstance(adatas, AnnData):
        adatas = [adatas]
    adatas = list(adatas)
    if not adatas:
        raise DomainInputError(f"{who} needs at least one AnnData")
    return adatas, normalize_levels(levels, n_domains), [sample_label(a, i) for i, a in enumerate(adatas)]


@runtime_checkable
class DomainModel(Protocol):
    """A fitted domain model; applying it to a new sample never changes earlier samples' ids."""

    levels: list[int]
    n_domains: int
    genes: list[str]

    def assign(self, adata: AnnData, *, sample_key: str | None = None) -> AnnData:
        """New AnnData with ``domain_level_{k}``, ``domain`` and ``X_domain_embedding`` (see module doc).

        ``sample_key``: obs column splitting ``adata`` into samples that must not be neighbours
        (each group gets its own spatial graph). The caller's AnnData is not modified.
        """
        ...

    def save(self, directory: str | Path) -> None:
        """Write the model as npz + json (no pickle) into ``directory``, incl. ``domain_model.json``."""
        ...

    @classmethod
    def load(cls, directory: str | Path) -> "DomainModel":
        ...

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description: engine, levels, n_domains, parameters, n genes, fit stats."""
        ...


@runtime_checkable
class DomainEngine(Protocol):
    """Fits a :class:`DomainModel` on one or several samples (one shared embedding for all)."""

    name: str

    def fit(
        self,
        adatas: Sequence[AnnData],
        *,
        levels: Sequence[int],
        n_domains: int,
        seed: int = 0,
        sample_key: str | None = None,
    ) -> DomainModel:
        """``levels`` must contain ``n_domains`` (use :func:`normalize_levels`)."""
        ...


def _import(name: str) -> Any:
    """The engine class registered as ``name``, imported now (optional extras: a clear error if absent)."""
    module, _, attr = ENGINES[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        needs, extra = OPTIONAL_ENGINES.get(name, ((), ""))
        missing = (exc.name or "").split(".")[0]
        if missing not in needs:
            raise
        raise EngineUnavailableError(
            f"domain engine {name!r} needs the optional dependencies {', '.join(needs)}, and {missing!r} "
            f"cannot be imported ({exc}); install them with: pip install 'spatial_assets[{extra}]' "
            f"(the default engine {DEFAULT_ENGINE!r} needs neither)"
        ) from exc


def get_engine(name: str, **config: Any) -> DomainEngine:
    """Engine by name with its configuration (constructor keywords); unknown name → ValueError."""
    if name not in ENGINES:
        raise DomainInputError(f"unknown domain engine {name!r}; known: {sorted(ENGINES)}")
    return _import(name)(**config)


def load_model(directory: str | Path) -> DomainModel:
    """Load any saved model: ``domain_model.json`` says which engine wrote it."""
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise DomainInputError(f"{directory}: not a saved domain model ({MODEL_JSON} missing)")
    meta = json.loads(path.read_text())
    name = meta.get("engine")
    if name not in ENGINES:
        raise DomainInputError(f"{path}: unknown engine {name!r}")
    cls = _import(name)
    model_cls = getattr(cls, "model_class", None)
    if model_cls is None:
        raise DomainInputError(f"engine {name!r} does not expose a model_class")
    return model_cls.load(directory)


def run_domains(
    adatas: AnnData | Sequence[AnnData],
    *,
    n_domains: int,
    levels: Sequence[int] | None = None,
    method: str = DEFAULT_ENGINE,
    batch_key: str | None = None,
    seed: int = 0,
    **engine_config: Any,
) -> tuple[list[AnnData], DomainModel]:
    """Fit ONE model on all inputs together and assign domains to each (new AnnData objects).

    Each input is one sample; ``batch_key`` names an obs column that splits inputs further into samples
    (no spatial edges across them). Ids are shared across all outputs because the model is shared.
    """
    adatas, lv, names = fit_inputs(adatas, levels, n_domains, who="run_domains")
    for a, name in zip(adatas, names):
        validate_spatial(a, name)
        validate_sample_key(a, batch_key, name)
    n_total = sum(a.n_obs for a in adatas)
    if n_total < max(lv):
        raise DomainInputError(f"{n_total} cells in all inputs is fewer than the {max(lv)} domains asked for")
    engine = get_engine(method, **engine_config)
    fit_assign = getattr(engine, "fit_assign", None)
    if fit_assign is not None:  # same result as fit + assign, without computing the features twice
        model, outs = fit_assign(adatas, levels=lv, n_domains=int(n_domains), seed=seed, sample_key=batch_key)
        return outs, model
    model = engine.fit(adatas, levels=lv, n_domains=int(n_domains), seed=seed, sample_key=batch_key)
    return [model.assign(a, sample_key=batch_key) for a in adatas], model


__all__ = [
    "DEFAULT_ENGINE",
    "DOMAIN",
    "DOMAIN_EMBEDDING_OBSM",
    "DOMAINS_UNS",
    "DomainEngine",
    "DomainInputError",
    "DomainModel",
    "ENGINES",
    "EngineUnavailableError",
    "OPTIONAL_ENGINES",
    "MODEL_JSON",
    "domain_categorical",
    "domain_id",
    "fit_inputs",
    "get_engine",
    "level_key",
    "load_model",
    "normalize_levels",
    "run_domains",
    "sample_label",
    "validate_sample_key",
    "validate_spatial",
]
