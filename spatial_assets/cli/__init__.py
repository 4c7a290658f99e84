"""``spatial-assets`` command line: one subcommand per product step, one module per subcommand.

Each module in :data:`COMMANDS` has ``add_parser(subparsers)`` that registers its subcommand and
sets ``func`` (args -> exit code). Modules are imported only to register their parser, so they
import nothing heavy at module level (science imports happen inside ``func``; a test checks that
building the parser loads neither anndata nor scanpy nor the domain engine).

Shared behaviour lives in :mod:`spatial_assets.cli.common`: every option's default in ``--help``,
progress lines on stderr, the list of files written, one-line errors. Exit codes: 0 success,
2 bad or unreadable input (one ``error: ...`` line naming the file, nothing written: outputs go to a
temporary file renamed / uploaded only on success), 1 unexpected error (one line; ``--debug``
prints the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from spatial_assets.cli.common import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNEXPECTED, HelpFormatter, error_line

DESCRIPTION = (
    "Cell-type and tissue-domain maps for spatial transcriptomics, without Dagster. "
    "Paths may be local or s3:// (endpoint and credentials from SPATIAL_ASSETS_S3_ENDPOINT / AWS_*). "
    "Exit codes: 0 success, 2 bad or unreadable input, 1 unexpected error."
)

#: subcommand modules under spatial_assets.cli, in ``--help`` order (add yours here)
COMMANDS: tuple[str, ...] = (
    "celltype",
    "domains",
    "deconvolve",
    "audit",
    "segment",
    "reference",
    "sample",
)


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=default, help="print the full traceback when a command fails"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatial-assets", description=DESCRIPTION, formatter_class=HelpFormatter
    )
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"spatial_assets.cli.{name}").add_parser(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        # accepted after the subcommand too; SUPPRESS keeps the global flag's value when absent
        _add_debug(command, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        return int(args.func(args))
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        code, line = error_line(exc)
        print(line, file=sys.stderr)
        return code


__all__ = ["COMMANDS", "EXIT_BAD_INPUT", "EXIT_OK", "EXIT_UNEXPECTED", "build_parser", "main"]
