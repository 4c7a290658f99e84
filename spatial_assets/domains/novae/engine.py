"""Novae (graph transformer + SwAV prototypes) as a domain engine, offline and on CPU.

Why this module is defensive rather than thin:

- Novae trained from scratch on CPU-sized budgets collapsed in every run we measured (loss stuck at
  ln(num_prototypes), latent effective rank ≈ 1.5; see docs/novae.md). So every fit measures collapse
  (latent effective rank, prototype usage, training loss and assignment entropy), records it in
  ``metadata()``, warns — or raises when ``strict_collapse=True``.
- ``Novae.from_pretrained`` loads non-strictly: a checkpoint whose ``config.json`` does not match its
  weights loads silently with random layers. We compare the weights file's keys/shapes with the built
  model, and a saved domain model additionally pins the weights' sha256, the hyperparameters and the
  gene vocabulary; any difference is refused (:class:`NovaeCheckpointError`).
- Nothing may download: a hub id is accepted only when the hub is reachable and not switched off.
- Novae mutates what it is given (normalises ``X``, adds obs/obsp); we only ever hand it private
  working copies, so callers' AnnData objects are never modified.
- Domain ids come from Novae's own prototype hierarchy (the tree behind ``assign_domains``), frozen
  at fit time as a leaf → domain table per level. A later sample is mapped through the same table, so
  its ids are those of the fit, and levels nest (a level-8 domain lies inside one level-4 domain).
"""

from __future__ import annotations

import os
import sys

# Must precede the first torch import: with OpenMP's default (active) waiting, two torch threads were
# 1.6–2.8x SLOWER than one on a busy machine (measured-facts.md). Respect an explicit user choice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_TORCH_IMPORTED_BEFORE = "torch" in sys.modules

import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scanpy as sc  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402
from anndata import AnnData  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402

from spatial_assets.domains.engine import (  # noqa: E402
    DOMAIN_EMBEDDING_OBSM,
    DOMAINS_UNS,
    MODEL_JSON,
    DomainInputError,
    domain_categorical,
    fit_inputs,
    level_key,
    sample_label,
    validate_sample_key,
    validate_spatial,
)
from spatial_assets.domains.graph import median_nn_distance  # noqa: E402
from spatial_assets.storage.objectstore import sha256_file  # noqa: E402
from spatial_assets.core.schema import COUNTS_LAYER, DOMAIN, SPATIAL_OBSM  # noqa: E402

log = logging.getLogger(__name__)

ENGINE_NAME = "novae"
FORMAT_VERSION = 1
NETWORK_DIR = "novae"  # save_pretrained output (config.json + model.safetensors) inside a model dir
TABLES_FILE = "leaf_domains.npz"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

Mode = Literal["zero_shot", "fine_tune", "train", "reuse"]
MODES: tuple[str, ...] = ("zero_shot", "fine_tune", "train", "reuse")

# working-copy column names (private; never reach the caller's objects)
_SLIDE_COL = "_novae_slide"
_LATENT = "novae_latent"  # novae.Keys.REPR
_VALID = "neighborhood_valid"  # novae.Keys.IS_VALID_OBS
# buffers whose presence depends on the training slides, not on the architecture
_OPTIONAL_STATE_KEYS = frozenset({"swav_head.queue"})
# hyperparameters that change the architecture or the meaning of the weights
_PINNED_HPARAMS = (
    "embedding_size",
    "output_size",
    "heads",
    "hidden_size",
    "num_layers",
    "num_prototypes",
    "n_hops_local",
    "n_hops_view",
    "embedding_name",
    "histo_embedding_size",
    "var_names",
)
_NN_TARGET_UM = 10.0  # typical centroid-to-nearest-centroid distance in tissue
# New (not loaded) networks: 4 GAT layers instead of Novae's 10. Untrained on STARmap K=4, seeds 0/1/2:
# 10 layers mean ARI 0.38/0.29/0.24, 4 layers 0.48/0.51/0.46, and ~30% less time (docs/novae.md).
NEW_NETWORK_DEFAULTS: dict[str, Any] = {"num_layers": 4}


class NovaeCheckpointError(DomainInputError):
    """A checkpoint that cannot be trusted: missing, unreachable, or not matching its description."""


class NovaeCollapseError(RuntimeError):
    """Training ended in the collapsed state (raised only with ``strict_collapse=True``)."""


# --------------------------------------------------------------------------------------------- helpers


def _novae() -> Any:
    """Import novae lazily: it pulls in lightning and torch_geometric (seconds of import time)."""
    import novae

    return novae


def _reassert_threads(n: int) -> None:
    """scanpy's first numba call re-sets the shared OpenMP thread count to the core count (measured:
    1 → 2 inside normalize_total), so the count is re-applied right before every torch-heavy step."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op torch threads and restore the previous setting afterwards."""
    if int(n) < 1:
        raise DomainInputError(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Novae's global switches for the duration of a call: no auto-preprocessing (ours is explicit),
    no per-call progress bars or Lightning banners (noise in pipeline logs). Restored afterwards."""
    novae = _novae()
    auto_pre, tq = novae.settings.auto_preprocessing, novae.utils.tqdm
    # we preprocess and choose genes ourselves; Novae's auto-HVG on a concat of slides drops half a
    # 166-gene panel (measured), which also disables its PCA gene-embedding init
    novae.settings.auto_preprocessing = False
    novae.utils.tqdm = lambda *a, **k: tq(*a, **{**k, "disable": True})
    lg = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [x.level for x in lg]
    for x in lg:
        x.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for x, lv in zip(lg, levels, strict=True):
            x.setLevel(lv)
        novae.settings.auto_preprocessing, novae.utils.tqdm = auto_pre, tq


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python/numpy/torch for a block (Novae draws from the global RNGs) and restore them after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def effective_rank(x: np.ndarray) -> float:
    """exp(entropy of the normalised singular values) of centred ``x``: ≈1 for a collapsed latent."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] < 2:
        return 0.0
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _is_integer_valued(x: Any) -> bool:
    data = x.data if sp.issparse(x) else np.asarray(x)
    return bool(data.size == 0 or np.all(np.mod(data, 1) == 0))


def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_checkpoint(spec: str | os.PathLike[str]) -> str:
    """Local directory → its path; a hub id only if the hub can be reached; anything else → error.

    Why: ``from_pretrained`` would otherwise try to download whatever does not exist locally.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / MODEL_JSON).is_file():  # one of our saved domain models: its network lives inside
            path = path / NETWORK_DIR
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / fname).is_file():
                raise NovaeCheckpointError(f"{path}: not a Novae checkpoint directory ({fname} missing)")
        return str(path)
    text = str(spec)
    looks_like_hub = text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))
    if not looks_like_hub:
        raise NovaeCheckpointError(f"{text}: checkpoint directory not found")
    if _hub_offline():
        raise NovaeCheckpointError(
            f"{text}: looks like a Hugging Face hub id but HF_HUB_OFFLINE is set; nothing is downloaded. "
            "Download the checkpoint where the hub is reachable (model.save_pretrained(dir)) and pass the directory."
        )
    if not _hub_reachable():
        raise NovaeCheckpointError(
            f"{text}: looks like a Hugging Face hub id but huggingface.co:443 is unreachable from here; "
            "pass a local checkpoint directory instead."
        )
    return text


def _file_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def check_state_dict(network: Any, weights: Path) -> None:
    """Refuse weights whose keys/shapes differ from the model built from config.json.

    Why: Novae loads non-strictly, so missing layers would silently stay random.
    """
    file_shapes = _file_shapes(weights)
    model_shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    missing = sorted(set(model_shapes) - set(file_shapes) - _OPTIONAL_STATE_KEYS)
    unexpected = sorted(set(file_shapes) - set(model_shapes) - _OPTIONAL_STATE_KEYS)
    shapes = sorted(
        f"{k}: file {file_shapes[k]} vs model {model_shapes[k]}"
        for k in set(file_shapes) & set(model_shapes)
        if file_shapes[k] != model_shapes[k] and k not in _OPTIONAL_STATE_KEYS
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing from the file (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}")
        raise NovaeCheckpointError(
            f"{weights}: weights do not match the architecture in {weights.parent / CONFIG_FILE}: " + "; ".join(parts)
        )


def load_network(spec: str | os.PathLike[str]) -> tuple[Any, str]:
    """Load a Novae network from a local checkpoint (or a reachable hub id) and validate it."""
    where = resolve_checkpoint(spec)
    novae = _novae()
    local = Path(where).is_dir()
    if local:  # shape mismatches raise inside torch: turn them into a clear, named error
        config = json.loads((Path(where) / CONFIG_FILE).read_text())
        if not isinstance(config, dict) or "var_names" not in config:
            raise NovaeCheckpointError(f"{Path(where) / CONFIG_FILE}: not a Novae config (no 'var_names')")
    try:
        network = novae.Novae.from_pretrained(where)
    except (RuntimeError, TypeError, ValueError, AssertionError, KeyError) as exc:
        raise NovaeCheckpointError(f"{where}: cannot load as a Novae checkpoint: {exc}") from exc
    if local:
        check_state_dict(network, Path(where) / WEIGHTS_FILE)
    return network, where


def _hparams(network: Any) -> dict[str, Any]:
    """JSON-safe copy of the hyperparameters."""
    return json.loads(json.dumps(dict(network.hparams), default=str))


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


class _TrainingRecorder:
    """Lightning callback factory: per-epoch loss, last-step entropy, threads seen during training."""

    def __new__(cls) -> Any:
        from lightning.pytorch.callbacks import Callback

        class Recorder(Callback):
            def __init__(self) -> None:
                self.epoch_loss: list[float] = []
                self.step_entropy: list[float] = []
                self.step_loss: list[float] = []
                self.threads_in_training: int | None = None
                self.steps = 0
                self.step_seconds: list[float] = []
                self._t = 0.0

            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                self.threads_in_training = torch.get_num_threads()

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
                self._t = time.perf_counter()

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
                self.step_seconds.append(time.perf_counter() - self._t)
                self.steps += 1
                m = trainer.callback_metrics
                if "train/entropy" in m:
                    self.step_entropy.append(float(m["train/entropy"]))
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                if loss is not None:
                    self.step_loss.append(float(loss))

            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                m = trainer.callback_metrics
                if "train/loss_epoch" in m:
                    self.epoch_loss.append(float(m["train/loss_epoch"]))

        return Recorder()


# ------------------------------------------------------------------------------------ working copies


def _select_genes(adatas: Sequence[AnnData], max_genes: int) -> list[str]:
    """Lower-cased sorted vocabulary. Targeted panels (≤ max_genes) keep every gene; larger ones keep
    the union of per-sample top-``max_genes`` HVGs. Sorted because Novae's own union is a python set
    (order changes between processes, and with it the gene embedding init)."""
    genes: set[str] = set()
    for a in adatas:
        names = pd.Index(a.var_names).str.lower()
        if a.n_vars <= max_genes:
            genes.update(names)
            continue
        tmp = AnnData(X=_log_expression(a, "input"), var=pd.DataFrame(index=names))
        sc.pp.highly_variable_genes(tmp, n_top_genes=max_genes)
        genes.update(tmp.var_names[tmp.var["highly_variable"].to_numpy()])
    return sorted(genes)


def _log_expression(adata: AnnData, name: str) -> Any:
    """log1p(normalise to 1e4) of raw counts (``layers['counts']`` or integer ``X``); log data as is.

    Why a fixed target sum: a cell's values must not depend on which other cells are in the batch.
    """
    if COUNTS_LAYER in adata.layers:
        x, counts = adata.layers[COUNTS_LAYER], True
    else:
        x = adata.X
        counts = _is_integer_valued(x)
    if x is None:
        raise DomainInputError(f"{name}: no expression matrix (X is None and no layers['{COUNTS_LAYER}'])")
    x = x.tocsr().astype(np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)
    data = x.data if sp.issparse(x) else x
    if data.size and (not np.all(np.isfinite(data)) or data.min() < 0):
        raise DomainInputError(f"{name}: expression has negative or non-finite values (need counts or log1p data)")
    if not counts and (data.size == 0 or data.max() < 20):
        return x.copy()  # already log-scale
    if not counts:
        log.warning("%s: X is linear-scale but not integer counts; normalising to 1e4 and log1p", name)
    tmp = AnnData(X=x.copy())
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    return tmp.X


def _working_copy(
    adata: AnnData, index: int, sample_key: str | None, radius_factor: float
) -> tuple[AnnData, dict[str, Any]]:
    """A private AnnData Novae may mutate: log expression, coordinates rescaled so the median nearest-
    neighbour distance is 10 µm (scale-free: units do not matter), Delaunay graph pruned at
    ``radius_factor`` × that distance, one slide id per (input, sample)."""
    name = sample_label(adata, index)
    xy = validate_spatial(adata, name)[:, :2]
    validate_sample_key(adata, sample_key, name)
    groups = adata.obs[sample_key].astype(str).to_numpy() if sample_key else np.full(adata.n_obs, "all")
    slide = np.char.add(f"s{index}:", groups.astype(str))
    scaled = np.empty_like(xy)
    per_group: dict[str, float] = {}
    for g in pd.unique(groups):
        m = groups == g
        if m.sum() < 3:
            raise DomainInputError(f"{name}: sample {g!r} has {int(m.sum())} cells; Novae needs a spatial graph")
        d = median_nn_distance(xy[m])
        per_group[str(g)] = d
        scaled[m] = xy[m] * (_NN_TARGET_UM / d)
    work = AnnData(
        X=_log_expression(adata, name),
        obs=pd.DataFrame({_SLIDE_COL: pd.Categorical(slide)}, index=pd.Index(adata.obs_names.astype(str))),
        var=pd.DataFrame(index=pd.Index(adata.var_names).str.lower()),
    )
    if not work.var_names.is_unique:
        dup = work.var_names[work.var_names.duplicated()][0]
        raise DomainInputError(f"{name}: gene {dup!r} appears twice (case-insensitive)")
    work.obs_names_make_unique()
    work.obsm[SPATIAL_OBSM] = scaled
    work.var["highly_variable"] = True  # gene choice is ours (vocabulary), not Novae's per-call HVG
    novae = _novae()
    novae.spatial_neighbors(work, slide_key=_SLIDE_COL, radius=radius_factor * _NN_TARGET_UM, verbose=False)
    degree = float(work.obsp["spatial_connectivities"].getnnz(axis=1).mean())
    info = {"median_nn_distance_input_units": per_group, "mean_degree": degree}
    return work, info


def _check_gene_overlap(adata: AnnData, vocabulary: Sequence[str], name: str, min_genes: int = 20) -> int:
    voc = set(vocabulary)
    genes = pd.Index(adata.var_names).str.lower()
    known = int(np.isin(genes, list(voc)).sum())
    if known < min_genes:
        missing = [g for g in genes if g not in voc][:5]
        raise NovaeCheckpointError(
            f"{name}: only {known} of {len(genes)} genes are in the model's vocabulary of {len(voc)} "
            f"(need >= {min_genes}); e.g. not in vocabulary: {missing}"
        )
    return known


# ------------------------------------------------------------------------------- latent + leaves


def _latent_and_leaves(
    network: Any, work: AnnData, accelerator: str, threads: int, compute: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Novae latent per cell and its prototype (leaf) index; -1 where Novae had no valid neighbourhood.
    ``compute=False`` reuses a latent already in ``work`` (zero-shot fit computed it for the k-means)."""
    if compute or _LATENT not in work.obsm:
        _reassert_threads(threads)
        network.compute_representations(work, accelerator=accelerator, num_workers=0)
    latent = np.asarray(work.obsm[_LATENT], dtype=np.float32)
    valid = work.obs[_VALID].to_numpy(dtype=bool)
    leaves = np.full(work.n_obs, -1, dtype=np.int64)
    if valid.any():
        with torch.no_grad():
            proj = network.swav_head.projection(torch.from_numpy(latent[valid]))
        leaves[valid] = proj.argmax(dim=1).numpy()
    return latent, leaves


def _fill_invalid(work: AnnData, latent: np.ndarray, leaves: np.ndarray, name: str) -> int:
    """Cells without a valid Novae neighbourhood take latent and leaf of the nearest valid cell of the
    same slide (every cell gets a domain). Returns how many were filled."""
    invalid = leaves < 0
    if not invalid.any():
        return 0
    slides = work.obs[_SLIDE_COL].to_numpy()
    xy = work.obsm[SPATIAL_OBSM]
    for s in pd.unique(slides[invalid]):
        ok = (slides == s) & ~invalid
        bad = (slides == s) & invalid
        if not ok.any():
            raise DomainInputError(f"{name}: no cell of sample {s!r} has a spatial neighbourhood (isolated cells)")
        _, j = NearestNeighbors(n_neighbors=1).fit(xy[ok]).kneighbors(xy[bad])
        src = np.flatnonzero(ok)[j[:, 0]]
        latent[bad] = latent[src]
        leaves[bad] = leaves[src]
    return int(invalid.sum())


def _leaf_tables(
    network: Any, leaves: np.ndarray, levels: Sequence[int], method: str = "kmeans", seed: int = 0
) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """leaf (prototype) → domain code per level, frozen so later samples get the same ids.

    ``kmeans``: the prototypes, weighted by how many training cells chose them, are clustered into k
    groups on the unit sphere. ``hierarchy``: Novae's own tree (what ``assign_domains(n_domains=k)``
    cuts; levels nest). Measured on STARmap (K=4, zero-shot latents): hierarchy cut 0.09 mean ARI — one
    domain took 2,937 of 3,190 cells — versus 0.38 for weighted k-means; hence the default.
    Codes are ordered by training-cell count (largest = D0). Prototypes no training cell chose go to
    the most similar domain (cosine to the domain's mean prototype).
    """
    head = network.swav_head
    n_proto = int(head.num_prototypes)
    counts = np.bincount(leaves[leaves >= 0], minlength=n_proto).astype(np.float64)
    used = np.flatnonzero(counts)
    protos = torch.nn.functional.normalize(head._prototypes.detach().float(), dim=1).numpy().astype(np.float64)
    if method == "hierarchy":
        head.reset_clustering()
    tables: dict[int, np.ndarray] = {}
    info: dict[str, Any] = {}
    for k in levels:
        enough = len(used) >= k  # a collapsed model may use fewer prototypes than k
        pool = used if enough else np.arange(n_proto)
        if method == "hierarchy":
            tree_level = int(head.find_level(pool, k))
            groups = head.clusters_levels[-tree_level].astype(np.int64)  # novae id of each leaf at this cut
            names = {int(c): f"D{int(c)}" for c in np.unique(groups[pool])}
            extra: dict[str, Any] = {"novae_tree_level": tree_level}
        else:
            from sklearn.cluster import KMeans

            w = counts[pool] if enough else counts[pool] + 1e-3
            km = KMeans(n_clusters=int(k), random_state=seed, n_init=10).fit(protos[pool], sample_weight=w)
            groups = np.full(n_proto, -1, dtype=np.int64)
            groups[pool] = km.labels_
            names = {int(c): f"kmeans{int(c)}" for c in np.unique(km.labels_)}
            extra = {}
        seen = sorted(names)
        size = {c: int(counts[pool][groups[pool] == c].sum()) for c in seen}
        order = sorted(seen, key=lambda c: (-size[c], c))
        code_of = {c: i for i, c in enumerate(order)}
        in_pool = np.zeros(n_proto, dtype=bool)
        in_pool[pool] = True
        table = np.array([code_of.get(int(groups[leaf]), -1) if in_pool[leaf] else -1 for leaf in range(n_proto)])
        if (table < 0).any():
            centroids = np.stack([protos[pool][groups[pool] == c].mean(axis=0) for c in order])
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
            orphan = np.flatnonzero(table < 0)
            table[orphan] = np.argmax(protos[orphan] @ centroids.T, axis=1)
        tables[int(k)] = table.astype(np.int64)
        info[str(k)] = {
            **extra,
            "method": method,
            "source_cluster_names": [names[c] for c in order],
            "training_cells_per_domain": [size[c] for c in order],
            "from_used_prototypes": bool(enough),
        }
    return tables, info


def _diagnostics(
    latent: np.ndarray,
    leaves: np.ndarray,
    n_prototypes: int,
    recorder: Any | None,
    *,
    rank_threshold: float,
    entropy_threshold: float,
    loss_ratio_threshold: float,
    seed: int,
) -> dict[str, Any]:
    """Collapse evidence. Thresholds: a collapsed run shows loss ≈ ln(K), Sinkhorn-assignment entropy ≈ 1
    and a latent of effective rank ≈ 1.5 (measured-facts.md)."""
    valid = leaves >= 0
    z = latent[valid]
    rng = np.random.default_rng(seed)
    if len(z) > 20_000:
        z = z[rng.choice(len(z), 20_000, replace=False)]
    rank = effective_rank(z)
    counts = np.bincount(leaves[valid], minlength=n_prototypes).astype(np.float64)
    p = counts[counts > 0] / counts.sum() if counts.sum() else np.array([1.0])
    usage_entropy = float(-(p * np.log(p)).sum() / math.log(n_prototypes)) if n_prototypes > 1 else 0.0
    out: dict[str, Any] = {
        "latent_dim": int(latent.shape[1]),
        "latent_effective_rank": round(rank, 4),
        "prototypes": int(n_prototypes),
        "prototypes_used": int((counts > 0).sum()),
        "prototype_usage_entropy_normalized": round(usage_entropy, 4),
        "ln_num_prototypes": round(math.log(n_prototypes), 4),
    }
    reasons = []
    if rank < rank_threshold:
        reasons.append(f"latent effective rank {rank:.2f} < {rank_threshold}")
    if recorder is not None and recorder.steps:
        final_loss = recorder.epoch_loss[-1] if recorder.epoch_loss else float(np.mean(recorder.step_loss[-5:]))
        ratio = final_loss / math.log(n_prototypes)
        tail = recorder.step_entropy[-5:]
        ent = float(np.mean(tail)) if tail else float("nan")
        out.update(
            {
                "train_steps": int(recorder.steps),
                "train_epochs": len(recorder.epoch_loss),
                "train_epoch_loss": [round(v, 4) for v in recorder.epoch_loss],
                "train_final_loss": round(final_loss, 4),
                "train_loss_over_ln_prototypes": round(ratio, 4),
                "train_final_entropy_normalized": round(ent, 4),
            }
        )
        if ratio > loss_ratio_threshold:
            reasons.append(
                f"final loss {final_loss:.3f} >= {loss_ratio_threshold} x ln({n_prototypes}) = "
                f"{loss_ratio_threshold * math.log(n_prototypes):.3f} (no better than uniform assignment)"
            )
        if ent > entropy_threshold:
            reasons.append(f"prototype-assignment entropy {ent:.3f} > {entropy_threshold}")
    out["collapsed"] = bool(reasons)
    out["collapse_reasons"] = reasons
    return out


# ------------------------------------------------------------------------------------------ model


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


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# ----------------------------------------------------------------------------------------- engine


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
            "omp_wait_policy_set_before_torch": not _TORCH_IMPORTED_BEFORE,
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
                recorder = _TrainingRecorder()
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
