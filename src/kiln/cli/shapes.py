"""Shape specs on the command line, as trtexec writes them: `name:1x3x224x224,other:1x128`.

A spec is split at its last ':' (so TensorFlow-style names such as `input:0` work); an empty shape (`name:`)
is a scalar. Optimization profiles come from `--shapes` (min = opt = max) or `--min-shapes/--opt-shapes/
--max-shapes`; `--profile` starts another profile, and the shape flags after it belong to that one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from kiln.utils.errors import KilnError

Shape = tuple[int, ...]
KINDS = ("shapes", "min", "opt", "max")


class ShapeSpecError(KilnError):
    """A shape spec on the command line is malformed or inconsistent."""


def parse_dims(text: str, where: str) -> Shape:
    """'1x3x224x224' -> (1, 3, 224, 224); '' -> () (a scalar)."""
    text = text.strip()
    if not text:
        return ()
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise ShapeSpecError(f"bad shape '{text}' in {where}: dims must be integers joined by 'x'",
                             hint="e.g. --shapes input:1x3x224x224,mask:1x128") from None
    if any(d < 0 for d in dims):
        raise ShapeSpecError(f"bad shape '{text}' in {where}: dims must be >= 0")
    return dims


def parse_shapes(specs: str | Sequence[str], flag: str = "--shapes") -> dict[str, Shape]:
    """One or more comma-separated `name:dims` specs -> {name: shape}. A name given twice is an error."""
    out: dict[str, Shape] = {}
    for spec in [specs] if isinstance(specs, str) else specs:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, dims = item.rpartition(":")
            if not sep or not name:
                raise ShapeSpecError(f"bad shape spec '{item}' for {flag}: expected NAME:DIMS",
                                     hint=f"e.g. {flag} input:1x3x224x224,mask:1x128")
            if name in out:
                raise ShapeSpecError(f"input '{name}' is given twice in {flag}")
            out[name] = parse_dims(dims, f"{flag} {item}")
    return out


class _ShapeAction(argparse.Action):
    """Records `--shapes/--min-shapes/...` into the current profile group, in command-line order."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        groups = _groups(ns)
        groups[-1].setdefault(self.dest, []).append(str(values))


class _ProfileAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        groups = _groups(ns)
        if groups[-1]:
            groups.append({})


def _groups(ns: argparse.Namespace) -> list[dict[str, list[str]]]:
    groups = getattr(ns, "profile_groups", None)
    if groups is None:
        groups = [{}]
        ns.profile_groups = groups
    return groups


def add_shape_args(p: argparse.ArgumentParser, *, profiles: bool) -> None:
    """`--shapes` (and with profiles=True, `--min/--opt/--max-shapes` and `--profile`)."""
    help_shapes = ("input shapes, trtexec style: NAME:1x3x224x224[,NAME2:1x128] (repeatable); "
                   + ("a fixed profile (min = opt = max)" if profiles else "the shapes to run at"))
    p.add_argument("--shapes", dest="shapes", action=_ShapeAction, metavar="SPEC", help=help_shapes)
    p.set_defaults(profile_groups=None)
    if not profiles:
        return
    for kind in ("min", "opt", "max"):
        p.add_argument(f"--{kind}-shapes", dest=kind, action=_ShapeAction, metavar="SPEC",
                       help=f"the {kind} shapes of a dynamic profile (repeatable)")
    p.add_argument("--profile", nargs=0, action=_ProfileAction,
                   help="start another optimization profile: the shape flags after it belong to the new profile "
                        "(e.g. --shapes x:1x3x8x8 --profile --min-shapes x:2x3x8x8 --max-shapes x:32x3x8x8)")


def runtime_shapes(ns: argparse.Namespace) -> dict[str, Shape]:
    """The `--shapes` of a command that runs (one group, min = opt = max)."""
    groups = getattr(ns, "profile_groups", None) or [{}]
    return parse_shapes(groups[0].get("shapes", []))


def profiles_from_args(ns: argparse.Namespace) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """Every profile group -> {input: (min, opt, max)}. A missing opt takes the max, then the min; a missing min
    or max takes the opt."""
    groups = [g for g in (getattr(ns, "profile_groups", None) or []) if g]
    return [_profile(k, g) for k, g in enumerate(groups)]


def _profile(k: int, group: dict[str, list[str]]) -> dict[str, tuple[Shape, Shape, Shape]]:
    parsed = {kind: parse_shapes(group.get(kind, []), _flag(kind)) for kind in KINDS}
    fixed = parsed["shapes"]
    ranged = set(parsed["min"]) | set(parsed["opt"]) | set(parsed["max"])
    both = sorted(set(fixed) & ranged)
    if both:
        raise ShapeSpecError(f"profile {k}: input '{both[0]}' is given both --shapes and --min/--opt/--max-shapes")
    out: dict[str, tuple[Shape, Shape, Shape]] = {name: (s, s, s) for name, s in fixed.items()}
    for name in sorted(ranged):
        lo, mid, hi = (parsed[kind].get(name) for kind in ("min", "opt", "max"))
        mid = mid or hi or lo
        assert mid is not None
        lo, hi = lo or mid, hi or mid
        _check_range(k, name, lo, mid, hi)
        out[name] = (lo, mid, hi)
    return out


def _check_range(k: int, name: str, lo: Shape, mid: Shape, hi: Shape) -> None:
    if not len(lo) == len(mid) == len(hi):
        raise ShapeSpecError(f"profile {k}: input '{name}' has min/opt/max of different ranks: "
                             f"{fmt(lo)}, {fmt(mid)}, {fmt(hi)}")
    if not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
        raise ShapeSpecError(f"profile {k}: input '{name}' needs min <= opt <= max in every dim, got "
                             f"{fmt(lo)}, {fmt(mid)}, {fmt(hi)}")


def _flag(kind: str) -> str:
    return "--shapes" if kind == "shapes" else f"--{kind}-shapes"


def fmt(shape: Sequence[Any] | None) -> str:
    """(1, 3, 224, 224) -> '1x3x224x224'; a scalar is 'scalar'."""
    if shape is None:
        return "?"
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"
