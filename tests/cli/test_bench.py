"""`kiln bench`: the trtexec-style report, its JSON export and its warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.cli.bench import MIN_QUERIES, make_report, stats, warnings
from tests.cli.helpers import kiln_cli, ok, tiny_cnn, user_error

ROWS = ("Latency", "Enqueue time", "H2D latency", "Compute time", "D2H latency")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bench")
    tiny_cnn(d / "cnn.onnx")
    ok(kiln_cli("build", str(d / "cnn.onnx"), "-o", str(d / "cnn.kiln"), "--min-shapes", "x:1x3x8x8", "--opt-shapes",
            "x:2x3x8x8", "--max-shapes", "x:4x3x8x8", "--opt-level", "0"))
    return d / "cnn.kiln"


def test_report_and_json(engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    text = ok(kiln_cli("bench", str(engine), "--iterations", "25", "--warmup", "0", "--json", str(out)))
    assert "timing trace: 25 queries" in text and "Throughput:" in text and "qps" in text
    header = next(line for line in text.splitlines() if "(ms)" in line)
    assert header.split()[1:] == ["min", "mean", "median", "p90", "p95", "p99", "max"]
    for row in ROWS:
        assert f"  {row}" in text
    assert "enqueue = the same host time" in text  # the CPU definitions are stated
    assert "random inputs (seed 0" in text and "x:2x3x8x8" in text  # the profile's opt shape
    r = json.loads(out.read_text())
    assert r["queries"] == 25 and len(r["trace_ms"]) == 25 and r["shapes"] == {"x": [2, 3, 8, 8]}
    assert r["throughput_qps"] == pytest.approx(25 / r["walltime_s"])
    for m in ("latency", "enqueue", "h2d", "compute", "d2h"):
        s = r["metrics_ms"][m]
        assert 0 < s["min"] <= s["median"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]
    for q in r["trace_ms"]:
        assert q["latency"] >= q["h2d"] + q["compute"] + q["d2h"] - 1e-6  # end to end covers the three phases
        assert q["enqueue"] == q["compute"]  # CPU: execute is synchronous


def test_duration_onnx_and_shapes(engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    text = ok(kiln_cli("bench", str(engine.parent / "cnn.onnx"), "--shapes", "x:3x3x8x8", "--duration", "0.3",
                   "--warmup", "0", "--json", str(out), "--cov-warn", "0"))
    r = json.loads(out.read_text())
    assert "built in memory" in text and r["shapes"] == {"x": [3, 3, 8, 8]}
    assert r["queries"] >= MIN_QUERIES and r["walltime_s"] >= 0.3
    assert "compute time is unstable" in text  # any variation is over a 0 % threshold


def test_user_mistakes(engine: Path) -> None:
    user_error(kiln_cli("bench", str(engine), "--iterations", "0"), "--iterations")
    user_error(kiln_cli("bench", str(engine), "--shapes", "x:9x3x8x8", "--iterations", "2"), "no optimization profile")
    user_error(kiln_cli("bench", str(engine), "--percentiles", "90,abc"), "--percentiles")
    both = kiln_cli("bench", str(engine), "--iterations", "3", "--duration", "1")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def _metrics(**median: float) -> dict[str, dict[str, float]]:
    return {m: {"median": median.get(m, 0.0), "cov_percent": 1.0} for m in ("latency", "enqueue", "h2d", "compute",
                                                                            "d2h")}


def test_warnings() -> None:
    m = _metrics(enqueue=0.95, compute=1.0)
    assert any("enqueue-bound" in w and "95 %" in w for w in warnings(m, 100, "cuda", 5.0))
    assert not any("enqueue-bound" in w for w in warnings(_metrics(enqueue=0.5, compute=1.0), 100, "cuda", 5.0))
    assert not any("enqueue-bound" in w for w in warnings(m, 100, "cpu", 5.0))  # CPU enqueue == compute by definition
    assert any("transfer-bound" in w for w in warnings(_metrics(h2d=1.0, d2h=1.0, compute=1.5), 100, "cpu", 5.0))
    assert any("only 3 queries" in w for w in warnings(_metrics(compute=1.0), 3, "cpu", 5.0))
    assert warnings(_metrics(compute=1.0, h2d=0.1), 100, "cpu", 5.0) == []


def test_stats_and_report() -> None:
    s = stats([0.001, 0.002, 0.003, 0.004], [50, 99])
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(4.0) and s["p50"] == pytest.approx(2.5)
    assert s["cov_percent"] == pytest.approx(100 * s["std"] / s["mean"])
    from kiln.cli.bench import Query

    qs = [Query(0.0, 0.001, 0.002, 0.02, 0.001, 0.025)] * 10
    r = make_report(qs, 0.5, [99], "cpu", 5.0)
    assert r["throughput_qps"] == pytest.approx(20.0) and r["total_compute_s"] == pytest.approx(0.2)
    assert r["warnings"] == []
