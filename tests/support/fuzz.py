"""Shared bits of the fuzz tests (tests/test_fuzz_*.py): hypothesis settings, the typed-error check and a
per-input count of the cases tried, printed as a table at the end of the session.

Every fuzz test body calls :func:`tried` once per generated case; :func:`summary_lines` turns the counts into the
table that the ``fuzz_report`` fixture prints (and that docs/testing.md's "Reliability" paragraph quotes).
"""

from __future__ import annotations

import threading
from collections import Counter

from hypothesis import HealthCheck, settings

COUNTS: Counter = Counter()
OUTCOMES: dict[str, Counter] = {}
_LOCK = threading.Lock()


def fuzz_settings(max_examples: int):
    """Deterministic (``derandomize``), bounded, no deadline (2 shared cores), no example database."""
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


def tried(input_name: str, outcome: str) -> None:
    """Count one case of ``input_name`` that ended in ``outcome`` (``ok`` or the typed error's class name)."""
    with _LOCK:
        COUNTS[input_name] += 1
        OUTCOMES.setdefault(input_name, Counter())[outcome] += 1


def summary_lines() -> list[str]:
    lines = [f"{'input':<34} {'cases':>6}  outcomes"]
    for name in sorted(COUNTS):
        outs = ", ".join(f"{k} {v}" for k, v in OUTCOMES[name].most_common())
        lines.append(f"{name:<34} {COUNTS[name]:>6}  {outs}")
    lines.append(f"{'total':<34} {sum(COUNTS.values()):>6}")
    return lines


def check_typed(exc: BaseException, allowed: tuple, names: tuple[str, ...]) -> str:
    """``exc`` must be one of ``allowed`` (the pack's typed errors) and its message must name one of ``names``
    (the input). Returns the class name for :func:`tried`. Anything else re-raises ``exc`` so the test fails with
    the original traceback."""
    if not isinstance(exc, allowed):
        raise exc
    msg = str(exc)
    if not any(n.lower() in msg.lower() for n in names):
        raise AssertionError(f"{type(exc).__name__} does not name the input (one of {names}): {msg}") from exc
    return type(exc).__name__


class _Report:
    """A plugin registered at run time: prints the table in pytest's terminal summary (after capturing ends)."""

    def pytest_terminal_summary(self, terminalreporter):
        if COUNTS:
            terminalreporter.section("fuzz cases tried per input")
            for line in summary_lines():
                terminalreporter.write_line(line)


def register_report(config) -> None:
    """Have the table printed at the end of this pytest session (idempotent)."""
    if not config.pluginmanager.has_plugin("instantfamily-fuzz-report"):
        config.pluginmanager.register(_Report(), "instantfamily-fuzz-report")
