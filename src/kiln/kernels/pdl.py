"""Programmatic dependent launch (PDL, sm_90 and newer) for kiln's Triton kernels.

A kernel launched with PDL may start while the kernel before it on the stream is still finishing. Each kiln
Triton kernel then waits for that kernel (`griddepcontrol.wait`: its writes complete and visible) as its first
instruction, before it reads or writes any memory, and - once all its programs have started - lets the next
kernel launch (`griddepcontrol.launch_dependents`). What overlaps is the next kernel's launch and its programs'
placement with this kernel's last wave: at batch 1 a transformer step is ~90 kernels of a few microseconds each,
and the gaps between them are a large share of the time. Kernels of other libraries (cuBLAS, cuDNN, torch) are
launched as before, and a kernel launched with PDL after one of them starts when it has completed.

The wait and the launch attribute go together. Generated modules get the two instructions in their kernels
(`with_wait`) and are launched through `launcher`, both decided when the kernel is built; hand-written kernels
take a constexpr `PDL` and call `mathlib.pdl_sync(PDL)` first, and their launchers pass `launch_options()`.

Whether it is on is per engine: `BuilderConfig.pdl` (stored in the engine file) is applied with `mode()` around a
build's tuning, an engine's kernel construction and each run; None (the default, and engines from before) means
the `KILN_PDL` environment variable: on unless it is "0". On by default since measured (H200, 2026-11-27, one
process, the same tactics with and without): ViT-B/16 batch 1 0.95x the time, BERT-base batch 1 0.91x, both at batch
128 1.00x; the GPU kernel tiers pass with it on and off. It is never on under the Triton interpreter (no grid
dependency control) or where a visible GPU is older than sm_90.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from typing import Any

_WAIT = ("gdc_wait()", "gdc_launch_dependents()")
_IMPORT = "from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait\n"
_MODE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("kiln_pdl", default=None)


@functools.cache
def supported() -> bool:
    """Not under the Triton interpreter, and every visible GPU is sm_90 or newer (read once)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    return all(torch.cuda.get_device_capability(i) >= (9, 0) for i in range(torch.cuda.device_count()))


def active() -> bool:
    """Whether kernels built or launched now use PDL: the current `mode`, else KILN_PDL; and `supported()`."""
    on = _MODE.get()
    if on is None:
        on = os.environ.get("KILN_PDL", "1") != "0"
    return bool(on) and supported()


@contextlib.contextmanager
def mode(on: bool | None) -> Iterator[None]:
    """PDL on or off (None: as KILN_PDL says, on unless "0") for the kernels built and launched inside."""
    token = _MODE.set(on)
    try:
        yield
    finally:
        _MODE.reset(token)


def launch_options() -> dict[str, Any]:
    """A hand-written kernel's launch keywords: its `PDL` constexpr, and the dependent launch when PDL is on."""
    return {"PDL": True, "launch_pdl": True} if active() else {"PDL": False}


def with_wait(source: str) -> str:
    """A generated module's `source` with the wait and the release as the first statements of each top-level
    `@triton.jit` function named `kiln_*` (its kernels; helpers they call are left alone), when PDL is on."""
    if not active():
        return source
    tree = ast.parse(source)
    lines = source.splitlines(True)
    at: list[tuple[int, str]] = []
    first_import = None
    for node in tree.body:
        if first_import is None and isinstance(node, (ast.Import, ast.ImportFrom)) and \
                not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            first_import = node.lineno - 1
        if isinstance(node, ast.FunctionDef) and node.name.startswith("kiln_") and \
                any("jit" in ast.unparse(d) for d in node.decorator_list):
            body = node.body[0]
            at.append((body.lineno - 1, " " * body.col_offset))
    for line, indent in sorted(at, reverse=True):
        lines[line:line] = [f"{indent}{w}\n" for w in _WAIT]
    if at:
        lines.insert(first_import or 0, _IMPORT)
    return "".join(lines)


class Launcher:
    """A kernel whose source went through `with_wait`, launched with PDL (`fn[grid](...)` as for the kernel)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __getitem__(self, grid: Any) -> Any:
        run = self.fn[grid]
        return lambda *args, **kw: run(*args, **kw, launch_pdl=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)


def launcher(fn: Any) -> Any:
    """`fn` launched with PDL when it is on (its module made by `with_wait` under the same mode), else `fn`."""
    return Launcher(fn) if active() else fn
