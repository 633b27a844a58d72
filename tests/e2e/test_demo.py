"""The README quickstart's main job, as `make demo` runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.cli.main import main

pytestmark = pytest.mark.slow


def test_demo_builds_runs_compares_and_benches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--cache-dir", str(tmp_path), "--bench-seconds", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "285  Egyptian cat" in out.split("kiln top-5:")[1].splitlines()[1]
    assert "top-5 identical" in out and "Throughput:" in out and out.rstrip().endswith("PASSED")
    assert (tmp_path / "efficientnet_lite0.kiln").stat().st_size > 1_000_000
