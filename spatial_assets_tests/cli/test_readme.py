"""The README's command-line example, run exactly as written, prints what the README says it prints."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import anndata as ad

from spatial_assets.cli import main
from spatial_assets.core import schema

README = Path(__file__).resolve().parents[2] / "README.md"


def _block_after(marker: str) -> str:
    text = README.read_text()
    m = re.search(re.escape(marker) + r"[^\n]*\n```\w*\n(.*?)\n```", text, flags=re.S)
    assert m, f"README has no code block after {marker!r}"
    return m.group(1)


def test_readme_cli_example_gives_the_stated_output(tmp_path, monkeypatch, capsys, data_dir) -> None:
    command = _block_after("<!-- cli-example").replace("\\\n", " ")
    argv = shlex.split(command)
    assert Path(argv[0]).name == "spatial-assets"
    stated = [line for line in _block_after("<!-- cli-output -->").splitlines() if line.strip()]
    (tmp_path / "data").symlink_to(data_dir)  # the example uses data/... relative to the repository root
    monkeypatch.chdir(tmp_path)

    assert main(argv[1:]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == stated  # every line, in order: counts, confidence, Unassigned fraction, files written

    # and the stated figures are those of the file written
    out = argv[argv.index("--out") + 1]
    a = ad.read_h5ad(tmp_path / out)
    unassigned = float((a.obs[schema.CELL_TYPE].astype(str) == schema.UNASSIGNED).mean())
    assert f"Unassigned fraction: {unassigned:.3f}" in stated
    assert f"{a.n_obs} cells annotated" == stated[0]
