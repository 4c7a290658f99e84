"""The parser: every option documented with its default, one-line command descriptions, no heavy imports."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spatial_assets.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("spatial_assets.domains.engine", "scanpy", "anndata", "torch", "h5py", "boto3", "sklearn")


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_building_the_parser_and_help_import_nothing_heavy() -> None:
    """In a fresh interpreter: the parser and every --help are built without the science stack."""
    code = (
        "import contextlib, io, json, sys\n"
        "from spatial_assets.cli import build_parser, COMMANDS\n"
        "p = build_parser()\n"
        "for argv in [['--help']] + [[c, '--help'] for c in COMMANDS]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        p.parse_args(argv)\n"
        f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command: str) -> None:
    sub = _subparsers(build_parser()).choices[command]
    text = " ".join(sub.format_help().split())  # unwrap
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"{command} {name} has no help"
        default = action.default
        if action.required or default is None or default is False or default is argparse.SUPPRESS:
            assert "(default: None)" not in text
            continue
        assert f"(default: {default})" in text, f"{command} {name}: default {default!r} not in --help"


def test_each_command_has_a_one_line_description() -> None:
    sub = _subparsers(build_parser())
    listed = {a.dest: a.help for a in sub._choices_actions}
    assert list(listed) == list(COMMANDS)
    for name, summary in listed.items():
        assert summary and "\n" not in summary and len(summary) <= 110, name
        assert sub.choices[name].description.startswith(summary), name


def test_debug_is_global_and_accepted_after_the_command(tmp_path: Path) -> None:
    parser = build_parser()
    base = ["audit", "--sample", "s1"]
    assert parser.parse_args(base).debug is False
    assert parser.parse_args(["--debug", *base]).debug is True
    assert parser.parse_args([*base, "--debug"]).debug is True


def test_cli_choices_are_the_libraries_own() -> None:
    """The parser lists engines / strategies without importing them; these must stay the real ones."""
    from spatial_assets.celltyping.balancing import STRATEGIES
    from spatial_assets.cli import celltype, domains
    from spatial_assets.domains.engine import DEFAULT_ENGINE, ENGINES

    assert set(domains.METHODS) == set(ENGINES) and domains.DEFAULT_METHOD == DEFAULT_ENGINE
    assert tuple(celltype.STRATEGIES) == tuple(STRATEGIES)
