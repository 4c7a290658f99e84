"""The Novae domain engine: fit one shared model on all samples (four modes), plus the public names.

See the package docstring (:mod:`spatial_assets.domains.novae`) for why the engine is defensive, and
docs/novae.md for the measured settings.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from anndata import AnnData

from spatial_assets.domains.engine import DomainInputError, fit_inputs
from spatial_assets.domains.novae import TORCH_IMPORTED_BEFORE
from spatial_assets.domains.novae.checkpoint import NovaeCheckpointError, check_state_dict, load_network, resolve_checkpoint
from spatial_assets.domains.novae.diagnostics import NovaeCollapseError, _diagnostics, _TrainingRecorder, effective_rank
from spatial_assets.domains.novae.inputs import _check_gene_overlap, _select_genes, _working_copy
from spatial_assets.domains.novae.leaves import _fill_invalid, _latent_and_leaves, _leaf_tables
from spatial_assets.domains.novae.model import ENGINE_NAME, NovaeDomainModel
from spatial_assets.domains.novae.runtime import _novae, _reassert_threads, quiet, seeded, torch_threads

log = logging.getLogger(__name__)

Mode = Literal["zero_shot", "fine_tune", "train", "reuse"]
MODES: tuple[str, ...] = ("zero_shot", "fine_tune", "train", "reuse")

# New (not loaded) networks: 4 GAT layers instead of Novae's 10. Untrained on STARmap K=4, seeds 0/1/2:
# 10 layers mean ARI 0.38/0.29/0.24, 4 layers 0.48/0.51/0.46, and ~30% less time (docs/novae.md).
NEW_NETWORK_DEFAULTS: dict[str, Any] = {"num_layers": 4}


class NovaeDomainEngine:
    """Fits one shared Novae model on all samples; see module doc and docs/novae.md for settings.

    ``mode``: ``zero_shot`` — latents of a checkpoint (or, without one, of the untrained network) and
    k-means prototypes; ``fine_tune`` — checkpoint + short training; ``train`` — from scratch (collapses on
    CPU budgets: measured); ``reuse`` — load a saved domain model from ``pretrained_dir``.
    """

    name = ENGINE_NAME
    model_class = NovaeDomainModel

    def __init__(
        self,
        *,
        mode: Mode = "zero_shot",
        pretrained_dir: str | None = None,
        max_epochs: int = 3,
        limit_train_batches: int | float | None = 10,
        patience: int = 2,
        min_delta: float = 0.05,
        lr: float = 5e-4,
        use_scheduler: bool | None = None,
        threads: int = 1,
        radius_factor: float = 3.0,
        accelerator: str = "cpu",
        num_workers: int = 0,
        max_genes: int = 500,
        domain_clustering: Literal["kmeans", "hierarchy"] = "kmeans",
        model_kwargs: dict[str, Any] | None = None,
        strict_collapse: bool = False,
        collapse_rank_threshold: float = 3.0,
        collapse_entropy_threshold: float = 0.95,
        collapse_loss_ratio: float = 0.95,
    ) -> None:
        if mode not in MODES:
            raise DomainInputError(f"novae mode must be one of {MODES}, got {mode!r}")
        if mode in ("fine_tune", "reuse") and not pretrained_dir:
            raise DomainInputError(f"novae mode {mode!r} needs pretrained_dir")
        if mode == "train" and pretrained_dir:
            raise DomainInputError("novae mode 'train' starts from scratch; use 'fine_tune' with pretrained_dir")
        if num_workers != 0:
            raise DomainInputError("num_workers must be 0 on CPU (worker processes were much slower; measured)")
        if max_epochs < 1 or radius_factor <= 0 or threads < 1:
            raise DomainInputError("max_epochs and threads must be >= 1 and radius_factor > 0")
        self.mode = mode
        self.pretrained_dir = pretrained_dir
        self.max_epochs = int(max_epochs)
        self.limit_train_batches = limit_train_batches
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.lr = float(lr)
        # Novae's schedule = 2 warm-up epochs then cosine over max_epochs - 2: max_epochs == 2 divides by
        # zero inside torch, 1 never leaves the 0.1x warm-up (measured); so off by default below 4 epochs
        self.use_scheduler = self.max_epochs >= 4 if use_scheduler is None else bool(use_scheduler)
        if self.use_scheduler and self.max_epochs < 3:
            raise DomainInputError(f"use_scheduler needs max_epochs >= 3 (2 warm-up epochs), got {self.max_epochs}")
        self.threads = int(threads)
        self.radius_factor = float(radius_factor)
        self.accelerator = accelerator
        self.max_genes = int(max_genes)
        if domain_clustering not in ("kmeans", "hierarchy"):
            raise DomainInputError(f"domain_clustering must be 'kmeans' or 'hierarchy', got {domain_clustering!r}")
        self.domain_clustering = domain_clustering
        self._seed = 0
        self.model_kwargs = dict(model_kwargs or {})
        self.strict_collapse = bool(strict_collapse)
        self.collapse_rank_threshold = float(collapse_rank_threshold)
        self.collapse_entropy_threshold = float(collapse_entropy_threshold)
        self.collapse_loss_ratio = float(collapse_loss_ratio)

    def params(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "pretrained_dir": self.pretrained_dir,
            "max_epochs": self.max_epochs,
            "limit_train_batches": self.limit_train_batches,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "lr": self.lr,
            "use_scheduler": self.use_scheduler,
            "threads": self.threads,
            "radius_factor": self.radius_factor,
            "accelerator": self.accelerator,
            "num_workers": 0,
            "max_genes": self.max_genes,
            "domain_clustering": self.domain_clustering,
            "model_kwargs": self.model_kwargs,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "omp_wait_policy_set_before_torch": not TORCH_IMPORTED_BEFORE,
        }

    def _trainer_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"enable_progress_bar": False, "enable_model_summary": False}
        if self.limit_train_batches is not None:
            kw["limit_train_batches"] = self.limit_train_batches
        return kw

    def fit(
        self,
        adatas: Sequence[AnnData],
        *,
        levels: Sequence[int],
        n_domains: int,
        seed: int = 0,
        sample_key: str | None = None,
    ) -> NovaeDomainModel:
        """Fit on all samples together (one model; Novae z-scores per slide), freeze the domain tables."""
        adatas, lv, names = fit_inputs(adatas, levels, n_domains, who="novae fit")
        novae = _novae()
        self._seed = int(seed)
        t0 = time.perf_counter()
        with torch_threads(self.threads), seeded(seed), quiet():
            if self.mode == "reuse":
                return self._reuse(adatas, names, lv, n_domains, sample_key)
            network, source = None, None
            if self.pretrained_dir:
                network, source = load_network(self.pretrained_dir)
                for a, n in zip(adatas, names, strict=True):
                    _check_gene_overlap(a, network.cell_embedder.gene_names, n)
            works, graph_info = [], []
            for i, a in enumerate(adatas):
                w, info = _working_copy(a, i, sample_key, self.radius_factor)
                works.append(w)
                graph_info.append(info)
            recorder = None
            t_train = 0.0
            if network is None:
                genes = _select_genes(adatas, self.max_genes)
                kwargs = {**NEW_NETWORK_DEFAULTS, **self.model_kwargs}
                kwargs.setdefault("embedding_size", min(100, max(2, len(genes) - 1)))
                network = novae.Novae(works, var_names=genes, **kwargs)
            n_proto = int(network.swav_head.num_prototypes)
            n_cells = sum(w.n_obs for w in works)
            if self.mode in ("zero_shot", "fine_tune") and n_cells < n_proto:
                raise DomainInputError(
                    f"{n_cells} cells in {names}: fewer than the model's {n_proto} prototypes, which are "
                    "re-estimated by k-means in this mode; fit on more cells or a model with fewer prototypes"
                )
            _reassert_threads(self.threads)
            if self.mode in ("train", "fine_tune"):
                recorder = _TrainingRecorder(self.threads)
                t1 = time.perf_counter()
                common = dict(
                    max_epochs=self.max_epochs,
                    accelerator=self.accelerator,
                    num_workers=0,
                    lr=self.lr,
                    use_scheduler=self.use_scheduler,
                    min_delta=self.min_delta,
                    patience=self.patience,
                    callbacks=[recorder],
                    **self._trainer_kwargs(),
                )
                if self.mode == "fine_tune":
                    network.fine_tune(works, reference="all", **common)
                else:
                    network.fit(works, **common)
                t_train = time.perf_counter() - t1
                network.mode.zero_shot = False
            t2 = time.perf_counter()
            if self.mode == "zero_shot":
                if not network.mode.trained:
                    network.mode.as_zero_shot()  # untrained encoder: its random graph features, on purpose
                network.compute_representations(works, zero_shot=True, accelerator=self.accelerator, num_workers=0)
            latents, leaves = [], []
            for w, n in zip(works, names, strict=True):
                z, leaf = _latent_and_leaves(
                    network, w, self.accelerator, self.threads, compute=self.mode != "zero_shot"
                )
                _fill_invalid(w, z, leaf, n)
                latents.append(z)
                leaves.append(leaf)
            t_repr = time.perf_counter() - t2
            all_latent, all_leaves = np.concatenate(latents), np.concatenate(leaves)
            diag = _diagnostics(
                all_latent,
                all_leaves,
                int(network.swav_head.num_prototypes),
                recorder,
                rank_threshold=self.collapse_rank_threshold,
                entropy_threshold=self.collapse_entropy_threshold,
                loss_ratio_threshold=self.collapse_loss_ratio,
                seed=seed,
            )
            tables, table_info = _leaf_tables(network, all_leaves, lv, self.domain_clustering, seed)
        fit_info = {
            "seed": int(seed),
            "checkpoint": source,
            "n_cells_fit": int(sum(a.n_obs for a in adatas)),
            "n_samples_fit": len(adatas),
            "graph": {n: g for n, g in zip(names, graph_info, strict=True)},
            "collapse": diag,
            "domain_tables": table_info,
            "threads_in_training": recorder.threads_in_training if recorder else None,
            "seconds": {
                "train": round(t_train, 2),
                # median over steps after the first (the first pays one-off setup)
                "train_step_median": round(float(np.median(recorder.step_seconds[1:] or recorder.step_seconds)), 3)
                if recorder and recorder.step_seconds else None,
                "representations": round(t_repr, 2),
                "total": round(time.perf_counter() - t0, 2),
            },
        }
        if diag["collapsed"]:
            msg = "Novae model collapsed (%s); its domains are not trustworthy" % "; ".join(diag["collapse_reasons"])
            if self.strict_collapse:
                raise NovaeCollapseError(msg)
            log.warning(msg)
        network.adatas = None  # do not keep the working copies alive
        network._datamodule = None
        return NovaeDomainModel(network, levels=lv, n_domains=n_domains, tables=tables,
                                params=self.params(), fit_info=fit_info)

    def _reuse(
        self, adatas: list[AnnData], names: list[str], lv: list[int], n_domains: int, sample_key: str | None
    ) -> NovaeDomainModel:
        """The saved model as is if it has the levels asked for; else new tables from these samples
        with the saved network (no training)."""
        model = NovaeDomainModel.load(self.pretrained_dir)  # type: ignore[arg-type]
        for a, n in zip(adatas, names, strict=True):
            _check_gene_overlap(a, model.genes, n)
        if set(lv) <= set(model.levels) and model.n_domains == n_domains:
            return model
        leaves = np.concatenate(
            [model.embed(a, sample_key=sample_key, name=n)[1] for a, n in zip(adatas, names, strict=True)]
        )
        tables, table_info = _leaf_tables(model.network, leaves, lv, self.domain_clustering, self._seed)
        fit_info = {**model.fit_info, "domain_tables": table_info, "tables_rebuilt_on_reuse": True}
        return NovaeDomainModel(model.network, levels=lv, n_domains=n_domains, tables=tables,
                                params={**model.params, "mode": "reuse", "pretrained_dir": self.pretrained_dir},
                                fit_info=fit_info)


def starmap_benchmark_config() -> dict[str, Any]:
    """Engine keywords benchmarks/bench_starmap_domains.py uses for Novae: the best offline setting
    measured (zero-shot latents of an untrained 4-layer network; docs/novae.md)."""
    return {"mode": "zero_shot", "threads": 1}


__all__ = [
    "NEW_NETWORK_DEFAULTS",
    "NovaeCheckpointError",
    "NovaeCollapseError",
    "NovaeDomainEngine",
    "NovaeDomainModel",
    "check_state_dict",
    "effective_rank",
    "load_network",
    "resolve_checkpoint",
    "seeded",
    "starmap_benchmark_config",
    "torch_threads",
]
