"""A skip says why in the run's own output, and under CI (`CI` set, as `.ci/run` runs) a skip is a failure.

`pytest.ini` asks for the short summary of skips (`-rs`), so `make test` lists every skip with its reason.
Under CI nothing may skip silently: a test that cannot run there (a missing browser, a missing file) is a
broken install step, not a pass.
"""

from __future__ import annotations

import os

import pytest


def _strict() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fail_the_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"skipped under CI, where nothing may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if _strict() and report.skipped and not hasattr(report, "wasxfail"):
        _fail_the_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    report = outcome.get_result()
    if _strict() and report.skipped:
        _fail_the_skip(report)
