"""Tissue domains: spatial graph, domain engines (fit once, assign to any sample), CLI.

Light on import on purpose: the Novae engine (torch) is only imported when asked for by name.
"""

from spatial_assets.domains.engine import (
    DEFAULT_ENGINE,
    DOMAIN_EMBEDDING_OBSM,
    DomainEngine,
    DomainInputError,
    DomainModel,
    domain_id,
    get_engine,
    level_key,
    load_model,
    run_domains,
)

__all__ = [
    "DEFAULT_ENGINE",
    "DOMAIN_EMBEDDING_OBSM",
    "DomainEngine",
    "DomainInputError",
    "DomainModel",
    "domain_id",
    "get_engine",
    "level_key",
    "load_model",
    "run_domains",
]
