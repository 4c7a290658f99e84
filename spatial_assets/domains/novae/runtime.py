"""Process-level switches around Novae/torch calls: threads, seeds, Novae's global settings.

Each is a context manager that restores what it changed, so a Novae fit inside a long-running process
(Dagster worker, notebook) leaves torch's thread count, the global RNGs and Novae's settings as found.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from spatial_assets.domains.engine import DomainInputError


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
