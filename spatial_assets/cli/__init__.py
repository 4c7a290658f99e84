"""``spatial-assets`` command line: one subcommand per product step, one module per subcommand.

Each module has ``add_parser(subparsers)`` that registers its subcommand and sets ``func``
(args -> exit code). Modules are imported only to register their parser; heavy science imports
happen inside ``func``. Bad input ends with exit code 2 and a one-line ``error: ...`` on stderr,
and no output file is written (outputs go to a temporary file renamed / uploaded only on success).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    from spatial_assets.cli import audit, celltype, deconvolve, domains

    parser = argparse.ArgumentParser(prog="spatial-assets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (celltype, domains, deconvolve, audit):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {type(exc).__name__}: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
