"""A pytest plugin that fails every skipped test and every skipped module: the suite's CI runs all of it, and a
test that is always skipped (a missing optional dependency, say) leaves its feature untested without anyone
seeing it. tests/conftest.py loads it; ``python -m pytest -p no_skips`` loads it anywhere."""
import pytest

MESSAGE = "skipped tests are not allowed: CI runs the whole suite (install the test extras); the skip said: "


def _fail(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", MESSAGE + reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail(outcome.get_result())
