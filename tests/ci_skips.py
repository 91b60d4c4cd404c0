"""Under CI (`CI=true`), a skipped test fails the run.

The suite skips a test when something it needs is absent (a backend binary,
tracefs, root): on a developer's machine that says what is missing and lets the
rest run. In CI nothing may be missing: `scripts/setup` installs everything, so
a skip there would only hide a broken install behind a green run. With
`CI=true` this plugin collects every skip (a test's, a fixture's, a module's)
and, at the end of the session, lists them and turns the exit status into
"tests failed". tests/conftest.py registers it; `python -m pytest -p
tests.ci_skips` loads it into any pytest run (tests/test_ci_skips.py does).
"""

from __future__ import annotations

import os

import pytest

PLUGIN_NAME = "fastshadow-ci-skips"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2]).removeprefix("Skipped: ")
    return str(lr)


class SkipsFailCI:
    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skipped.append((report.nodeid, _reason(report)))

    def pytest_collectreport(self, report) -> None:
        if report.skipped:
            self.skipped.append((report.nodeid or "<collection>", _reason(report)))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.skipped and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.skipped:
            return
        tr = terminalreporter
        tr.section("CI=true: skipped tests fail the run", sep="=", red=True, bold=True)
        tr.line(f"{len(self.skipped)} test(s) skipped; in CI nothing may be missing "
                "(scripts/setup installs it all), so each skip is a failure:", red=True)
        for nodeid, reason in self.skipped:
            tr.line(f"SKIPPED-IN-CI {nodeid}: {reason}", red=True)


def pytest_configure(config) -> None:
    if in_ci() and not config.pluginmanager.has_plugin(PLUGIN_NAME):
        config.pluginmanager.register(SkipsFailCI(), PLUGIN_NAME)
