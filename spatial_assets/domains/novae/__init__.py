"""Novae (graph transformer + SwAV prototypes) as a domain engine, offline and on CPU — an optional extra.

``pip install 'spatial_assets[novae]'`` brings torch and novae; the default (neighbourhood) engine needs
neither, and nothing outside this package imports them. Modules, along the engine's seams:

- :mod:`.engine` — :class:`NovaeDomainEngine` (fit in the four modes) and the public names;
- :mod:`.model` — :class:`NovaeDomainModel` (assign, save, verified load);
- :mod:`.checkpoint` — resolving and validating checkpoints (no download, no silent partial load);
- :mod:`.diagnostics` — collapse evidence and the training recorder;
- :mod:`.inputs` — private working copies Novae may mutate, gene vocabulary;
- :mod:`.leaves` — latents, prototype leaves and the frozen leaf → domain tables;
- :mod:`.runtime` — torch threads, seeding, Novae's global switches.

Why this package is defensive rather than thin:

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
- Domain ids come from Novae's prototypes, frozen at fit time as a leaf → domain table per level. A
  later sample is mapped through the same table, so its ids are those of the fit.
"""

import os
import sys

# Must precede the first torch import (every module of this package imports torch after this file ran):
# with OpenMP's default (active) waiting, two torch threads were 1.6–2.8x SLOWER than one on a busy
# machine (measured-facts.md). Respect an explicit user choice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
TORCH_IMPORTED_BEFORE = "torch" in sys.modules
