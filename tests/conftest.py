"""Shared pytest setup: the conformance pass count, printed at the end of every run that includes it."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

BIG_GPU_MEMORY_LOCK = os.path.join(tempfile.gettempdir(), "kiln-tests-big-gpu-memory.lock")
GPU_LOCK = os.path.join(tempfile.gettempdir(), "kiln-tests-gpu.lock")


@pytest.fixture(autouse=True)
def _timed_tests_have_the_gpu_alone(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under `pytest -n N` every gpu test holds a shared lock and a test marked timed an exclusive one, so a timed
    comparison never runs beside other GPU work (at -n 8 a timing there would measure the neighbours too)."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    import fcntl

    with open(GPU_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if request.node.get_closest_marker("timed") else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _one_big_gpu_test_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests marked big_gpu_memory (tens of GiB on the card) hold an exclusive file lock while they run: under
    `pytest -n N` two of them at once ran the card out of memory (2026-11-27, H100, -n 8)."""
    if request.node.get_closest_marker("big_gpu_memory") is None:
        yield
        return
    import fcntl

    with open(BIG_GPU_MEMORY_LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


CONFORMANCE_GOAL = 1800
_outcomes: dict[str, dict[str, int]] = {}


def _is_conformance(item_id: str) -> bool:
    return "conformance/test_onnx_backend.py" in item_id.replace(os.sep, "/")


def pytest_runtest_logreport(report: Any) -> None:
    if not _is_conformance(report.nodeid):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.outcome == "skipped" else "xpassed"
        else:
            outcome = report.outcome
        _outcomes.setdefault(report.nodeid, {})[outcome] = 1


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not _outcomes:
        return
    counts = _counts()
    ran = sum(v for k, v in counts.items() if k != "skipped")
    passed = counts.get("passed", 0)
    line = (f"ONNX backend conformance (CPU): {passed} passed of {ran} run, {counts.get('xfailed', 0)} expected "
            f"failures, {counts.get('failed', 0)} failed, {counts.get('xpassed', 0)} unexpectedly passed "
            f"(goal: >= {CONFORMANCE_GOAL} passed)")
    terminalreporter.write_sep("=", line)


def _counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for per in _outcomes.values():
        for k in per:
            counts[k] = counts.get(k, 0) + 1
    return counts


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """A full conformance run below the goal fails the session, even if every listed case behaved."""
    counts = _counts()
    ran = sum(v for k, v in counts.items() if k != "skipped")
    if ran >= 2000 and counts.get("passed", 0) < CONFORMANCE_GOAL and session.exitstatus == 0:
        session.exitstatus = 1
