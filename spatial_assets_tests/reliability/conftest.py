"""The reliability suite prints its own tally: ``reliability: N cases, P passed, F failed, S skipped``.

Every test (every parametrized instance) under this directory is one case. Run the suite alone with
``python -m pytest -q -p no:cacheprovider spatial_assets_tests/reliability``; the line also appears
at the end of a full ``make test``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_outcomes: dict[str, str] = {}


def _is_case(nodeid: str, fspath: str | None) -> bool:
    return fspath is not None and Path(fspath).resolve().is_relative_to(_HERE)


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not _is_case(report.nodeid, str(report.fspath) if report.fspath else None):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.skipped:
            _outcomes[report.nodeid] = "skipped"
        elif report.failed:
            _outcomes[report.nodeid] = "failed"
        elif report.nodeid not in _outcomes:
            _outcomes[report.nodeid] = "passed"
    elif report.when == "teardown" and report.failed:
        _outcomes[report.nodeid] = "failed"


def pytest_terminal_summary(terminalreporter) -> None:
    if not _outcomes:
        return
    counts = {k: sum(v == k for v in _outcomes.values()) for k in ("passed", "failed", "skipped")}
    terminalreporter.write_line(
        f"reliability: {len(_outcomes)} cases, {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    )
