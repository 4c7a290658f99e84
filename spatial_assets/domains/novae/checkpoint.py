"""Novae checkpoints: resolved locally (or from a reachable hub, never a download behind the user's back)
and validated tensor by tensor, because ``Novae.from_pretrained`` loads non-strictly."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from spatial_assets.domains.engine import MODEL_JSON, DomainInputError
from spatial_assets.domains.novae.runtime import _novae

NETWORK_DIR = "novae"  # save_pretrained output (config.json + model.safetensors) inside a model dir
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
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


class NovaeCheckpointError(DomainInputError):
    """A checkpoint that cannot be trusted: missing, unreachable, or not matching its description."""


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



def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
