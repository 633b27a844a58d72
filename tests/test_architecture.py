"""DESIGN.md's import rules, enforced: the folders are the architecture."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kiln"

# What each top-level package may import from kiln (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "ir": {"utils"},
    "frontend": {"utils", "ir"},
    "passes": {"utils", "ir"},
    "precision": {"utils", "ir", "frontend", "passes"},
    "kernels": {"utils", "ir"},
    "runtime": {"utils", "ir", "kernels"},
    "tune": {"utils", "ir", "kernels", "runtime"},
    "build": {"utils", "ir", "frontend", "passes", "precision", "kernels", "runtime", "tune"},
    "cli": {"utils", "ir", "frontend", "passes", "precision", "kernels", "runtime", "tune", "build", "__init__"},
}
# Third-party modules a package must not touch: the IR knows no file format; a deployed engine needs no onnx.
FORBIDDEN_EXTERNAL: dict[str, set[str]] = {
    "ir": {"onnx", "google", "safetensors", "onnxruntime"},
    "runtime": {"onnx", "onnxruntime"},
    "kernels": {"onnx", "onnxruntime"},
}


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
            if node.module == "kiln":
                out.extend((f"kiln.{a.name}", node.lineno) for a in node.names)
    return out


def _files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def test_every_package_is_known() -> None:
    pkgs = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert pkgs <= set(ALLOWED), f"new package(s) without an import rule: {pkgs - set(ALLOWED)}"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(SRC)))
def test_import_direction(path: Path) -> None:
    rel = path.relative_to(SRC)
    if len(rel.parts) == 1:
        return  # kiln/__init__.py is the public API and may import everything
    pkg = rel.parts[0]
    bad = []
    for mod, line in _imports(path):
        parts = mod.split(".")
        if parts[0] == "kiln" and len(parts) > 1:
            target = parts[1] if (SRC / parts[1]).is_dir() else "__init__"
            if target != pkg and target not in ALLOWED[pkg]:
                bad.append(f"line {line}: {pkg} imports kiln.{target}")
        elif parts[0] in FORBIDDEN_EXTERNAL.get(pkg, set()):
            bad.append(f"line {line}: {pkg} imports {mod}")
    assert not bad, f"{rel}: " + "; ".join(bad)


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("from kiln.build import builder\nimport onnx\n")
    mods = [m for m, _ in _imports(f)]
    assert mods == ["kiln.build", "onnx"]
    assert "build" not in ALLOWED["runtime"] and "onnx" in FORBIDDEN_EXTERNAL["ir"]

