"""`kiln inspect`: metadata, plan steps, memory plan, per-step times, JSON and the HTML report."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

import kiln
from tests.cli.helpers import kiln_cli, ok, tiny_cnn, user_error

# After optimization the tiny CNN (conv1 -> relu1 -> flat -> fc) runs in three steps: the Relu is conv1's epilogue.
LAYERS = ["conv1 + relu1", "flat", "fc"]
FUSED = [["conv1", "relu1"], ["flat"], ["fc"]]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("inspect")
    tiny_cnn(d / "cnn.onnx")
    ok(kiln_cli("build", str(d / "cnn.onnx"), "-o", str(d / "cnn.kiln"), "--min-shapes", "x:1x3x8x8", "--opt-shapes",
                "x:2x3x8x8", "--max-shapes", "x:4x3x8x8", "--profile", "--shapes", "x:8x3x8x8"))
    return d / "cnn.kiln"


def test_text(engine: Path) -> None:
    text = ok(kiln_cli("inspect", str(engine)))
    e = kiln.load(engine)
    assert "model       cnn.onnx (graph 'cnn', opset 17)" in text
    assert "profile 0   x 1x3x8x8..4x3x8x8 (opt 2x3x8x8)" in text and "profile 1   x 8x3x8x8" in text
    assert f"activation arena {e.plan.memory.arena_bytes / 1024:.1f} KiB planned vs" in text
    rows = [line.split("  ") for line in text.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    rows = [[c.strip() for c in r if c.strip()] for r in rows]
    assert [r[1] for r in rows] == LAYERS
    assert [r[2] for r in rows] == ["Fused[epilogue: Conv+Relu]", "Flatten", "MatMul"]
    for row, choice in zip(rows, e.plan.choices[0]):  # the tactic, with its configuration's values if it has one
        shown = choice.tactic + (f"({', '.join(map(str, choice.config.values()))})" if choice.config else "")
        assert any(shown[:45] in cell for cell in row), (shown, row)
    assert "x[N,3,8,8] +2 const" in text and "y[N,10]" in text


def test_json(engine: Path) -> None:
    r = json.loads(ok(kiln_cli("inspect", str(engine), "--json")))
    e = kiln.load(engine)
    assert [la["name"] for la in r["layers"]] == LAYERS and [la["fused"] for la in r["layers"]] == FUSED
    assert all(la["precision"] == "float32" for la in r["layers"])
    assert [[t["tactic"] for t in la["tactics"]] for la in r["layers"]] == \
        [[per[i].tactic for per in e.plan.choices] for i in range(3)]
    conv = r["layers"][0]
    assert conv["inputs"][0] == {"name": "x", "type": "float32[N,3,8,8]", "dtype": "float32", "shape": ["N", 3, 8, 8],
                                 "constant": False}
    assert conv["inputs"][1]["constant"] and conv["outputs"][0]["shape"] == ["N", 4, 8, 8]
    mem = r["memory"]
    assert mem["arena_bytes"] == e.plan.memory.arena_bytes and mem["naive_bytes"] == e.plan.memory.naive_bytes
    assert 0 < mem["arena_bytes"] <= mem["naive_bytes"]
    assert r["metadata"]["device"]["kind"] == "cpu" and r["size_bytes"] == engine.stat().st_size
    assert "profile" not in r and "time_ms" not in conv


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_profile_json_and_html(engine: Path, tmp_path: Path) -> None:
    html = tmp_path / "r.html"
    r = json.loads(ok(kiln_cli("inspect", str(engine), "--profile", "--runs", "3", "--shapes", "x:3x3x8x8", "--json",
                               "--html", str(html))))
    p = r["profile"]
    assert p["runs"] == 3 and p["input_shapes"] == {"x": [3, 3, 8, 8]} and p["profile_index"] == 0
    times = [la["time_ms"] for la in r["layers"]]
    assert all(t > 0 for t in times) and p["total_ms_median"] > 0
    assert sum(la["time_percent"] for la in r["layers"]) == pytest.approx(100.0)
    assert r["layers"][0]["observed_output_shapes"] == [[3, 4, 8, 8]]
    assert r["layers"][2]["observed_output_shapes"] == [[3, 10]]
    page = html.read_text()
    parser = _Tags()
    parser.feed(page)
    assert {"table", "svg", "rect", "style"} <= set(parser.tags)
    assert not {"script", "link", "img", "iframe"} & set(parser.tags)  # self-contained: nothing to fetch
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")
    body = " ".join(parser.text)
    for name in LAYERS:
        assert name in body
    assert parser.tags.count("rect") >= len(LAYERS) + 2  # one bar per layer, two for the memory plan


def test_text_profile(engine: Path) -> None:
    text = ok(kiln_cli("inspect", str(engine), "--profile", "--runs", "2"))
    assert "profiled    2 runs on cpu at x:2x3x8x8 (host clock)" in text
    assert "time ms" in text and text.count("%)") == len(LAYERS)


def test_user_mistakes(engine: Path, tmp_path: Path) -> None:
    user_error(kiln_cli("inspect", str(tmp_path / "none.kiln")), "none.kiln", "not found")
    user_error(kiln_cli("inspect", str(engine.parent / "cnn.onnx")), "not a kiln engine file")
    broken = tmp_path / "broken.kiln"
    data = bytearray(engine.read_bytes())
    data[100] ^= 0xFF
    broken.write_bytes(bytes(data))
    user_error(kiln_cli("inspect", str(broken)), "corrupted")
    user_error(kiln_cli("inspect", str(engine), "--profile", "--shapes", "x:16x3x8x8"), "no optimization profile")


def test_fused_steps_are_named_after_their_nodes() -> None:
    import torch

    from kiln.cli.inspect import op_label, origins
    from kiln.ir import DType, Graph, TensorType
    from kiln.passes.rewrite import fuse

    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, (1, 3, 4, 4)))
    w = g.add_initializer("w", torch.ones(2, 3, 1, 1))
    (c,) = g.add("Conv", [x, w], name="/layer1/conv1")
    (r,) = g.add("Relu", [c], name="relu")
    g.outputs = [r]
    node = fuse(g, g.nodes, "epilogue")
    assert origins(node) == ["/layer1/conv1", "relu"]
    assert op_label(node) == "Fused[epilogue: Conv+Relu]"


def test_the_table_names_the_configuration_that_won() -> None:
    from kiln.cli.inspect import _tactic

    assert _tactic({"tactic": "triton.int8_conv", "config": {"tile": "128x64x64-w4s4"}}) == \
        "triton.int8_conv(128x64x64-w4s4)"
    assert _tactic({"tactic": "cuda.conv", "config": {"format": "given", "fuse": "cudnn"}}) == "cuda.conv(given, cudnn)"
    assert _tactic({"tactic": "reference", "config": {}}) == "reference"


def test_the_config_line_says_pdl_when_the_engine_sets_it(tmp_path: Path) -> None:
    tiny_cnn(tmp_path / "cnn.onnx")
    for flag, shown in (("--pdl", ", pdl on"), ("--no-pdl", ", pdl off"), (None, "")):
        out = tmp_path / f"{flag}.kiln"
        ok(kiln_cli("build", str(tmp_path / "cnn.onnx"), "-o", str(out), "--shapes", "x:1x3x8x8", "--opt-level", "0",
                    *([flag] if flag else [])))
        line = next(x for x in ok(kiln_cli("inspect", str(out))).splitlines() if x.startswith("config"))
        assert line.endswith("opt level 0" + shown), line
