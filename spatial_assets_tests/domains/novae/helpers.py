"""What the Novae test modules share: a tiny network configuration and the engine factory.

Tiny synthetic tissue (seeded) and a tiny Novae (2 layers, 32 prototypes) so the package stays well
under a minute on a shared 2-core machine. Quality (ARI) is measured by
benchmarks/bench_novae_domains.py, not here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TINY = {"num_prototypes": 32, "heads": 2, "num_layers": 2, "hidden_size": 32, "output_size": 16, "batch_size": 64}
LEVELS = [2, 4]

#: non-local connection attempts seen by the ``no_network`` fixture (conftest.py)
NETWORK_ATTEMPTS: list[object] = []


def _engine(**kw: object):
    from spatial_assets.domains.novae.engine import NovaeDomainEngine

    base = {"mode": "train", "max_epochs": 1, "limit_train_batches": 2, "threads": 1, "model_kwargs": TINY}
    base.update(kw)
    return NovaeDomainEngine(**base)  # type: ignore[arg-type]


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(src, dst)
    return dst
