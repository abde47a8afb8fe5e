"""pytest plugin of the conformance suite: options, the store factory fixture, the matrix summary.

Loaded by ``-p kvstore.testing.conformance.plugin`` (or a ``pytest11`` entry point), it makes
``pytest --pyargs kvstore.testing.conformance --kvstore-url URL`` check one store. Tests that
run cases over several targets call ``record_cell(node, target, case_id)``; the plugin then
prints one line per target at the end and, with ``--kvstore-matrix FILE``, writes the whole
target x case grid as JSON (what ``scripts/gen_conformance_doc.py`` renders).
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

CELL = "kvstore-conformance-cell"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvstore", "kvstore conformance")
    group.addoption("--kvstore-url", metavar="URL", help="store to check (s3://..., file:///..., memory://...)")
    group.addoption("--kvstore-config", metavar="FILE", help="extra_config as YAML or JSON")
    group.addoption("--kvstore-set", metavar="KEY=VALUE", action="append", default=[],
                    help="one extra_config entry (repeatable)")
    group.addoption("--kvstore-matrix", metavar="FILE", help="write the conformance results as JSON")


@pytest.fixture(scope="session")
def kvstore_factory(pytestconfig: pytest.Config):
    """A ``ConformanceRun`` over the store the command line names; cleaned up at the end."""
    from kvstore.cli.common import load_extra_config
    from kvstore.testing.conformance import ConformanceRun

    url = pytestconfig.getoption("kvstore_url")
    if not url:
        raise pytest.UsageError("the kvstore conformance suite needs --kvstore-url URL")
    extra = load_extra_config(pytestconfig.getoption("kvstore_config"), pytestconfig.getoption("kvstore_set"))
    factory = ConformanceRun(url, extra)
    yield factory
    factory.cleanup()


def record_cell(node: pytest.Item, target: str, case_id: str) -> None:
    """Mark a test as one cell of the conformance matrix."""
    node.user_properties.append((CELL, (target, case_id)))


def _cells(terminalreporter) -> dict[str, dict[str, dict[str, str]]]:
    """target -> case -> {"outcome", "detail"} from the reports of marked tests."""
    grid: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
    for reports in terminalreporter.stats.values():
        for report in reports:
            cell = dict(getattr(report, "user_properties", ())).get(CELL)
            if cell is None or (report.when != "call" and not report.skipped and not report.failed):
                continue
            target, case_id = cell
            outcome = "skip" if report.skipped else "fail" if report.failed else "pass"
            detail = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                detail = report.longrepr[2].removeprefix("Skipped: ")
            elif report.failed:
                detail = str(getattr(report.longrepr, "reprcrash", None) and report.longrepr.reprcrash.message or "")
            if grid[target].get(case_id, {}).get("outcome") != "fail":  # a teardown error does not hide a failure
                grid[target][case_id] = {"outcome": outcome, "detail": detail}
    return grid


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    grid = _cells(terminalreporter)
    if not grid:
        return
    from kvstore.cli.common import print_table

    class _Writer:
        def write(self, text: str) -> None:
            terminalreporter.write(text)

    terminalreporter.section("kvstore conformance matrix")
    rows = []
    for target, cases in grid.items():
        outcomes = [c["outcome"] for c in cases.values()]
        failing = [case_id for case_id, c in cases.items() if c["outcome"] == "fail"]
        rows.append((target, outcomes.count("pass"), outcomes.count("fail"), outcomes.count("skip"), " ".join(failing)))
    print_table(("target", "pass", "fail", "skip", "failing cases"), rows, out=_Writer())
    path = config.getoption("kvstore_matrix")
    if path:
        with open(path, "w") as f:
            json.dump(grid, f, indent=1)
            f.write("\n")
