"""`kiln cache merge/show`: timing caches from separate builds become one that makes both rebuilds time nothing."""

from __future__ import annotations

import json

from tests.cli.helpers import kiln_cli, ok, tiny_cnn, user_error


def _entries(path) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(path.read_text())["entries"]


def test_merge_two_build_caches_and_show_them(tmp_path) -> None:
    model = tiny_cnn(tmp_path / "m.onnx")
    for shape, name in (("1x3x8x8", "a"), ("4x3x8x8", "b")):
        ok(kiln_cli("build", model, "--shapes", f"x:{shape}", "-o", str(tmp_path / f"{name}.kiln"),
                    "--timing-cache", str(tmp_path / f"{name}.tcache")))
    a, b = _entries(tmp_path / "a.tcache"), _entries(tmp_path / "b.tcache")
    assert a and b and set(a) != set(b)  # different shapes, different keys
    out = ok(kiln_cli("cache", "merge", str(tmp_path / "all.tcache"), str(tmp_path / "a.tcache"),
                      str(tmp_path / "b.tcache")))
    merged = _entries(tmp_path / "all.tcache")
    assert set(merged) == set(a) | set(b)
    assert f"{len(merged)} entries" in out
    shown = ok(kiln_cli("cache", "show", str(tmp_path / "all.tcache")))
    assert f"{len(merged)} entries" in shown
    for entry in merged.values():  # every (op, chosen tactic) pair is listed, whichever tactic won the timing
        assert any(entry["op"] in line and line.rstrip().endswith(entry["tactic"]) for line in shown.splitlines())


def test_merge_names_a_missing_input(tmp_path) -> None:
    user_error(kiln_cli("cache", "merge", str(tmp_path / "out.tcache"), str(tmp_path / "nope.tcache")),
               "nope.tcache", "does not exist")


def test_a_file_that_is_not_a_cache_is_refused(tmp_path) -> None:
    bad = tmp_path / "bad.tcache"
    bad.write_text("{}")
    user_error(kiln_cli("cache", "show", str(bad)), "not a kiln timing cache")
