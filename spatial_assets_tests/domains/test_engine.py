"""Engine registry (domains/engine.py): choice by name, and Novae/torch as an optional extra.

The optional-extra tests run in a subprocess: only a fresh interpreter can show that a code path does
not import torch, or behave as if novae were not installed (an import blocker on ``sys.meta_path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spatial_assets.domains.engine import DomainEngine, get_engine

ROOT = Path(__file__).resolve().parents[2]

# makes `import novae` / `import torch` fail as they do when the extra is not installed
_BLOCK = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'novae', 'torch'}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def _run(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_engine_registry_refuses_unknown_names_and_options() -> None:
    # (the default being the neighbourhood engine is checked by behaviour: run_domains without
    # a method records engine "neighborhood" in test_neighborhood.py)
    assert isinstance(get_engine("neighborhood"), DomainEngine)
    with pytest.raises(ValueError, match="unknown domain engine"):
        get_engine("nope")
    with pytest.raises(ValueError, match="unknown neighborhood engine option"):
        get_engine("neighborhood", lamda=0.3)


def test_default_engine_and_cli_parser_do_not_import_torch_or_novae() -> None:
    """Importing the registry, fitting + assigning with the default engine and building the CLI parser
    (incl. parsing ``domains --method novae``) leave torch and novae out of ``sys.modules``."""
    code = """
import json, sys
import spatial_assets.domains.engine as engine
from spatial_assets.domains.synthetic import make_synthetic_tissue, split_samples
outs, model = engine.run_domains(split_samples(make_synthetic_tissue(600, n_domains=3, seed=1)), n_domains=3)
from spatial_assets.cli import build_parser
args = build_parser().parse_args(["domains", "--spatial", "x.h5ad", "--n-domains", "3", "--method", "novae", "--out", "o.h5ad"])
print(json.dumps({"torch": "torch" in sys.modules, "novae": "novae" in sys.modules,
                  "domains": sorted(set(outs[0].obs["domain"].astype(str))), "method": args.method}))
"""
    out = _run(code)
    assert out == {"torch": False, "novae": False, "domains": ["L3_D0", "L3_D1", "L3_D2"], "method": "novae"}


def test_novae_engine_without_the_extra_says_how_to_install_it() -> None:
    """With novae/torch not importable: choosing the Novae engine (by name, via run_domains, or loading
    a saved Novae model) is a clear error naming the extra; the default engine still works."""
    code = _BLOCK + """
import json
from spatial_assets.domains.engine import EngineUnavailableError, get_engine, load_model, run_domains
from spatial_assets.domains.synthetic import make_synthetic_tissue, split_samples
import tempfile, pathlib
samples = split_samples(make_synthetic_tissue(600, n_domains=3, seed=1))
msgs = []
for call in (lambda: get_engine("novae"),
             lambda: run_domains(samples, n_domains=3, method="novae")):
    try:
        call()
    except EngineUnavailableError as exc:
        msgs.append(str(exc))
d = pathlib.Path(tempfile.mkdtemp())
(d / "domain_model.json").write_text(json.dumps({"engine": "novae"}))
try:
    load_model(d)
except EngineUnavailableError as exc:
    msgs.append(str(exc))
outs, _ = run_domains(samples, n_domains=3)
print(json.dumps({"messages": msgs, "default_ok": len(outs) == 2}))
"""
    out = _run(code)
    assert out["default_ok"] is True
    assert len(out["messages"]) == 3
    for msg in out["messages"]:
        assert "pip install 'spatial_assets[novae]'" in msg and "'novae'" in msg
