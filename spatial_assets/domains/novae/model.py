"""A fitted Novae domain model: network + frozen leaf → domain tables; assign, save, verified load."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from spatial_assets.core.schema import DOMAIN
from spatial_assets.domains.engine import (
    DOMAIN_EMBEDDING_OBSM,
    DOMAINS_UNS,
    MODEL_JSON,
    domain_categorical,
    level_key,
    sample_label,
)
from spatial_assets.domains.novae.checkpoint import (
    _PINNED_HPARAMS,
    CONFIG_FILE,
    NETWORK_DIR,
    WEIGHTS_FILE,
    NovaeCheckpointError,
    _file_shapes,
    _hparams,
    _short,
    load_network,
)
from spatial_assets.domains.novae.inputs import _check_gene_overlap, _working_copy
from spatial_assets.domains.novae.leaves import _fill_invalid, _latent_and_leaves
from spatial_assets.domains.novae.runtime import _novae, quiet, torch_threads
from spatial_assets.storage.objectstore import sha256_file

ENGINE_NAME = "novae"
FORMAT_VERSION = 1
TABLES_FILE = "leaf_domains.npz"


def _json_safe(obj: Any) -> Any:
    """Plain python types only, no None (h5ad ``uns`` cannot store None)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj if v is not None]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


class NovaeDomainModel:
    """A fitted Novae network plus the frozen leaf → domain tables; see module doc."""

    engine_name = ENGINE_NAME

    def __init__(
        self,
        network: Any,
        *,
        levels: Sequence[int],
        n_domains: int,
        tables: dict[int, np.ndarray],
        params: dict[str, Any],
        fit_info: dict[str, Any],
    ) -> None:
        self.network = network
        self.levels = [int(k) for k in levels]
        self.n_domains = int(n_domains)
        self.tables = {int(k): np.asarray(v, dtype=np.int64) for k, v in tables.items()}
        self.params = dict(params)
        self.fit_info = dict(fit_info)
        self.genes: list[str] = list(network.cell_embedder.gene_names)

    # -- assignment
    def embed(
        self, adata: AnnData, *, sample_key: str | None = None, name: str = "input"
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(latent, leaves, info) for every cell of ``adata``; the caller's object is untouched."""
        _check_gene_overlap(adata, self.genes, name)
        with torch_threads(self.params["threads"]), quiet():
            work, info = _working_copy(adata, 0, sample_key, self.params["radius_factor"])
            threads, accelerator = self.params["threads"], self.params["accelerator"]
            latent, leaves = _latent_and_leaves(self.network, work, accelerator, threads)
            info["cells_without_neighbourhood_filled"] = _fill_invalid(work, latent, leaves, name)
        return latent, leaves, info

    def assign(self, adata: AnnData, *, sample_key: str | None = None) -> AnnData:
        """New AnnData with ``domain_level_{k}``, ``domain`` and the Novae latent (see engine.py)."""
        name = sample_label(adata, 0)
        t0 = time.perf_counter()
        latent, leaves, info = self.embed(adata, sample_key=sample_key, name=name)
        out = adata.copy()
        for k in self.levels:
            out.obs[level_key(k)] = domain_categorical(k, self.tables[k][leaves])
        out.obs[DOMAIN] = out.obs[level_key(self.n_domains)].copy()
        out.obsm[DOMAIN_EMBEDDING_OBSM] = latent.astype(np.float32)
        meta = self.metadata()
        meta["assign"] = {**info, "seconds": round(time.perf_counter() - t0, 3)}
        out.uns[DOMAINS_UNS] = _json_safe(meta)
        return out

    def metadata(self) -> dict[str, Any]:
        """Engine, levels, parameters, training record and collapse diagnostics (JSON-safe)."""
        return _json_safe(
            {
                "engine": ENGINE_NAME,
                "format_version": FORMAT_VERSION,
                "levels": self.levels,
                "n_domains": self.n_domains,
                "n_genes": len(self.genes),
                "novae_version": _novae().__version__,
                "params": self.params,
                **self.fit_info,
            }
        )

    # -- persistence
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``domain_model.json`` + ``leaf_domains.npz`` + ``novae/`` (safetensors), atomically."""
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.network.save_pretrained(tmp / NETWORK_DIR)
            weights = tmp / NETWORK_DIR / WEIGHTS_FILE
            np.savez(tmp / TABLES_FILE, **{f"level_{k}": v for k, v in self.tables.items()})
            doc = {
                **self.metadata(),
                "genes": self.genes,
                "hparams": _hparams(self.network),
                "state_dict_shapes": {k: list(v) for k, v in _file_shapes(weights).items()},
                "weights_sha256": sha256_file(weights),
            }
            (tmp / MODEL_JSON).write_text(json.dumps(doc, indent=1, sort_keys=True))
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
                os.replace(target, old / "x")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> NovaeDomainModel:
        """Load and verify: weights hash, hyperparameters, gene vocabulary and tensor shapes must all
        match what ``save`` recorded; anything else is refused."""
        root = Path(directory)
        meta_path = root / MODEL_JSON
        if not meta_path.is_file():
            raise NovaeCheckpointError(f"{root}: not a saved domain model ({MODEL_JSON} missing)")
        doc = json.loads(meta_path.read_text())
        if doc.get("engine") != ENGINE_NAME:
            raise NovaeCheckpointError(f"{meta_path}: engine is {doc.get('engine')!r}, not {ENGINE_NAME!r}")
        net_dir = root / NETWORK_DIR
        weights = net_dir / WEIGHTS_FILE
        if not weights.is_file() or not (net_dir / CONFIG_FILE).is_file():
            raise NovaeCheckpointError(f"{net_dir}: Novae checkpoint files missing")
        digest = sha256_file(weights)
        if digest != doc.get("weights_sha256"):
            raise NovaeCheckpointError(
                f"{weights}: sha256 {digest[:12]}… differs from the {doc.get('weights_sha256', '?')[:12]}… "
                f"recorded in {meta_path} (weights replaced or corrupted)"
            )
        config = json.loads((net_dir / CONFIG_FILE).read_text())
        recorded = doc.get("hparams", {})
        for key in _PINNED_HPARAMS:
            if config.get(key) != recorded.get(key):
                what = "gene vocabulary" if key == "var_names" else f"hyperparameter {key!r}"
                raise NovaeCheckpointError(
                    f"{net_dir / CONFIG_FILE}: {what} differs from {meta_path} "
                    f"({_short(config.get(key))} vs {_short(recorded.get(key))})"
                )
        network, _ = load_network(net_dir)
        genes = list(network.cell_embedder.gene_names)
        if genes != doc.get("genes"):
            raise NovaeCheckpointError(f"{meta_path}: gene vocabulary differs from the loaded network's")
        shapes = {k: tuple(v) for k, v in doc.get("state_dict_shapes", {}).items()}
        if shapes != _file_shapes(weights):
            raise NovaeCheckpointError(f"{meta_path}: recorded tensor shapes differ from {weights}")
        with np.load(root / TABLES_FILE, allow_pickle=False) as z:
            tables = {int(k.split("_", 1)[1]): z[k] for k in z.files}
        levels = [int(k) for k in doc["levels"]]
        if sorted(tables) != sorted(levels):
            raise NovaeCheckpointError(f"{root / TABLES_FILE}: levels {sorted(tables)} differ from {levels}")
        n_proto = int(network.swav_head.num_prototypes)
        for k, t in tables.items():
            if t.shape != (n_proto,) or t.min() < 0 or t.max() >= k:
                raise NovaeCheckpointError(f"{root / TABLES_FILE}: table of level {k} is inconsistent")
        reserved = {"engine", "format_version", "levels", "n_domains", "n_genes", "novae_version", "params",
                    "genes", "hparams", "state_dict_shapes", "weights_sha256"}
        fit_info = {k: v for k, v in doc.items() if k not in reserved}
        return cls(network, levels=levels, n_domains=int(doc["n_domains"]), tables=tables,
                   params=doc["params"], fit_info=fit_info)
