"""Shared test set-up: the repository root and tests/ on sys.path (``support`` holds reusable generators),
and no network at import of insightface 0.7.3.

``clone_rule``: a test (or a module, through ``pytest.mark.usefixtures("clone_rule")``) that uses it runs once under
each way ``ModelPatcher.clone()`` copies ``model_options`` — ComfyUI 0.3.64's deep copy and 0.38's dict/list-only
copy (``support/clone_rules.py``) — on the real host.

Under ``CI=true`` nothing may skip: a missing ComfyUI host stops the run at start, and any test that would skip
(a missing optional package, browser or host) fails instead, with the skip's own reason."""

import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for p in (TESTS, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config):
    if _in_ci():
        from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
        if find_comfyui() is None:
            raise pytest.UsageError(f"CI=true: {HOW_TO_PROVIDE}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a skipped test is a failed test here ({reason})"


def pytest_generate_tests(metafunc):
    if "clone_rule" in metafunc.fixturenames:
        from support.clone_rules import CLONE_RULES
        metafunc.parametrize("clone_rule", CLONE_RULES, indirect=True, ids=[f"clone-{r}" for r in CLONE_RULES])


@pytest.fixture
def clone_rule(request):
    """The clone rule this test runs under (see the module docstring); the host is imported first."""
    from support.clone_rules import use_clone_rule
    from tools.devkit.comfy_host import import_host
    import_host()
    with use_clone_rule(request.param):
        yield request.param
