"""Collapse evidence for a Novae fit, and the Lightning callback that records training.

Thresholds: a collapsed run shows loss ≈ ln(K), Sinkhorn-assignment entropy ≈ 1 and a latent of
effective rank ≈ 1.5 (measured-facts.md).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch


class NovaeCollapseError(RuntimeError):
    """Training ended in the collapsed state (raised only with ``strict_collapse=True``)."""


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


class _TrainingRecorder:
    """Lightning callback factory: per-epoch loss, last-step entropy, threads seen during training.

    It also re-applies ``threads`` at the start of training and of every step: the first numba call
    (inside Novae's data preparation, after our own setting) re-sets the OpenMP thread count that
    torch shares to the core count (measured: 1 -> 2). ``threads_in_training`` is read at the end of
    the first step, i.e. what the step actually ran with.
    """

    def __new__(cls, threads: int) -> Any:
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
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                self._t = time.perf_counter()

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
                self.step_seconds.append(time.perf_counter() - self._t)
                if self.threads_in_training is None:
                    self.threads_in_training = torch.get_num_threads()
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
