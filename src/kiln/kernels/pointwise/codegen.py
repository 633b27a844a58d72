"""One generator for every pointwise group: a graph of elementwise ops becomes one Triton kernel.

The graph (a Fused "pointwise" body, or the epilogue steps of a GEMM/conv, see `epilogue_graph`) may be any DAG
with several outputs. Its iteration domain is the shape every output has; inputs and constants broadcast into it
numpy-style. The kernel is a 1-D grid over the flattened domain, BLOCK elements per program: it loads each
operand once (upcasting float16/bfloat16 to float32), evaluates the ops in registers (`rules`), and stores each
output cast to its dtype. How operands are indexed (flat, broadcast, strided) is planned per call from the actual
shapes and strides (`layout`); the generated source depends only on that plan's kinds, so kernels are reused
across sizes. Scalar constants of the body are baked into the source; larger ones become tensor arguments.

    kernel = PointwiseKernel(graph)            # raises UnsupportedError unless supports(graph)
    outs = kernel([x, bias])                   # new contiguous outputs
    kernel([acc, bias], out=[acc])             # in place: an output may alias an input of its shape and dtype

Triton needs real source files: each distinct source is written once under the kiln cache directory, keyed by its
hash, and imported. `import triton` happens only then, so this module loads without triton.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Shape, TensorType, Value
from kiln.kernels import pdl
from kiln.kernels.pointwise import layout as lay
from kiln.kernels.pointwise.rules import FP8, NARROW, SUPPORTED, Expr, compute, float_text, reason, storage
from kiln.utils.env import env
from kiln.utils.errors import InputError, KilnError, UnsupportedError

# --- the program: a graph turned into kernel body text -----------------------------------------------------------


@dataclass(frozen=True)
class Operand:
    """A tensor the kernel reads: graph input `input`, or a body constant `data`."""

    dtype: DType
    input: int | None = None
    data: torch.Tensor | None = None


@dataclass
class Program:
    operands: list[Operand] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    results: list[Expr] = field(default_factory=list)
    domain: Shape = ()
    """The outputs' shape (symbolic dims allowed)."""
    grows: list[Shape] = field(default_factory=list)
    """Shapes of values that are not operands but may widen the domain (Expand outputs)."""
    ops: list[str] = field(default_factory=list)


class _Refused(Exception):
    pass


class _Body:
    """Builds the body text (the `rules.Builder` protocol) and maps graph values to expressions."""

    reciprocal_quotients = False  # a pointwise kernel's QuantizeLinear is exact, as the reference

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.prog = Program()
        self.env: dict[Value, Expr] = {}
        self.positions = {v: i for i, v in enumerate(graph.inputs)}
        self.data: list[Value] = []

    def let(self, text: str, dtype: DType, exact: bool | None = None) -> Expr:
        name = f"v{len(self.prog.lines)}"
        self.prog.lines.append(f"{name} = {text}")
        return Expr(name, dtype, dtype not in NARROW if exact is None else exact)

    def lit(self, value: float | int | bool, dtype: DType) -> Expr:
        text = float_text(float(value)) if dtype.is_float else str(int(value))
        e = self.let(f"tl.full([BLOCK], {text}, {compute(dtype)})", dtype, True)
        return Expr(e.text, dtype, True, value)

    def value(self, v: Value) -> Expr:
        e = self.env.get(v)
        if e is None:
            e = self.env[v] = self._leaf(v)
            self.data.append(v)
        return e

    def _leaf(self, v: Value) -> Expr:
        if v.type.dtype is FP8 and isinstance(v.data, torch.Tensor) and v.data.numel() == 1:  # type: ignore[union-attr]
            return self.lit(float(v.data.float().reshape(())), DType.FLOAT32)  # a float8 zero point (checked 0)
        _check_type(v)
        if v in self.positions:
            return self._operand(Operand(v.dtype, input=self.positions[v]))
        if not isinstance(v.data, torch.Tensor):
            raise _Refused(f"value '{v.name}' is neither a graph input, a constant nor computed in the graph")
        if v.data.numel() == 1:
            return self.lit(v.data.reshape(()).item(), v.dtype)
        return self._operand(Operand(v.dtype, data=v.data))

    def _operand(self, op: Operand) -> Expr:
        self.prog.operands.append(op)
        return Expr(f"a{len(self.prog.operands) - 1}", op.dtype)

    def node(self, n: Node) -> None:
        why = reason(n)
        if why is not None:
            raise _Refused(f"node '{n.name}': {why}")
        rule = _rule(n.op)
        data = range(len(n.inputs)) if rule.data is None else rule.data
        args = [self.value(v) if v is not None and i in data else None for i, v in enumerate(n.inputs)]
        _check_type(n.outputs[0], n.op)
        self.env[n.outputs[0]] = rule.emit(self, n, args)
        self.data.append(n.outputs[0])
        if n.op == "Expand":
            self.prog.grows.append(_shape(n.outputs[0]))
        self.prog.ops.append(n.op)


def _rule(op: str) -> Any:
    from kiln.kernels.pointwise.rules import RULES

    return RULES[op]


def _check_type(v: Value, made_by: str | None = None) -> None:
    """`made_by`: the op computing `v` in the group (float8 values are generated only as QuantizeLinear's output;
    the rules refuse every op reading one)."""
    if not isinstance(v.type, TensorType) or v.type.shape is None:
        raise _Refused(f"value '{v.name}' is not a tensor of known rank")
    if v.type.dtype not in SUPPORTED and not (v.type.dtype is FP8 and made_by == "QuantizeLinear"):
        raise _Refused(f"value '{v.name}' has dtype {v.type.dtype}, which is not generated")


def _shape(v: Value) -> Shape:
    assert isinstance(v.type, TensorType) and v.type.shape is not None
    return v.type.shape


def _fits(small: Shape, big: Shape, named: bool = False) -> bool:
    """Whether `small` broadcasts to `big` without growing it. With `named`, a named dim against a known size
    fits, either way round: the model's inputs and outputs keep their symbolic batch where the profile fixed the
    size every computed value has (MobileNet's input Cast [batch, 3, 224, 224] -> [128, 3, 224, 224], BERT's
    output Cast [128, 128, 768] -> [batch, seq, 768]); a generated kernel checks at run time that its inputs' real
    shapes broadcast to the domain (`PointwiseKernel._domain`). Epilogue tiles, which choose their loads from
    static shapes, leave `named` off."""
    return len(small) <= len(big) and all(d == 1 or d == b or (named and isinstance(d, int) != isinstance(b, int))
                                          for d, b in zip(small, big[len(big) - len(small):]))


def build_program(graph: Graph) -> Program:
    """The kernel body for `graph`; raises UnsupportedError naming what cannot be generated."""
    try:
        return _build(graph)
    except _Refused as e:
        raise UnsupportedError(str(e), hint="the reference (or another tactic) runs this group") from None


def _build(graph: Graph) -> Program:
    if not graph.outputs:
        raise _Refused("the graph has no outputs")
    body = _Body(graph)
    for n in graph.nodes:
        body.node(n)
    prog = body.prog
    prog.results = [body.value(v) for v in graph.outputs]
    prog.domain = _shape(graph.outputs[0])
    for v in graph.outputs:
        if _shape(v) != prog.domain:
            raise _Refused(f"outputs have different shapes ({_shape(v)} and {prog.domain})")
    for v in body.data:
        if not _fits(_shape(v), prog.domain, named=True):
            raise _Refused(f"value '{v.name}' of shape {_shape(v)} does not broadcast into the domain {prog.domain}")
    return prog


def check(graph: Graph) -> str | None:
    """Why `graph` cannot become one pointwise kernel, or None when it can."""
    try:
        _build(graph)
    except _Refused as e:
        return str(e)
    except Exception as e:  # why: supports() must answer, whatever a malformed graph holds
        return f"{type(e).__name__}: {e}"
    return None


def supports(graph: Graph) -> bool:
    """Whether every op, dtype and shape of `graph` can be generated (never raises)."""
    return check(graph) is None


# --- source text -----------------------------------------------------------------------------------------------


_HEADER = '''"""Generated by kiln.kernels.pointwise.codegen ({ops})."""
import triton
import triton.language as tl

from kiln.kernels.pointwise import mathlib as km

INF = tl.constexpr(float("inf"))


@triton.jit
def kiln_pointwise({params}BLOCK: tl.constexpr):
'''


def render(prog: Program, layout: lay.Layout) -> str:
    """The source of the kernel for `prog` under `layout` (operands: reads in order, then outputs)."""
    n_in = len(prog.operands)
    ptrs = [f"p{k}" for k in range(n_in)] + [f"o{k}" for k in range(len(prog.results))]
    keys = lay.arg_keys(layout)
    params = "".join(f"{p}, " for p in [*ptrs, "n", *(_arg_name(k) for k in keys)])
    pid = "tl.program_id(0).to(tl.int64)" if layout.wide else "tl.program_id(0)"
    lines = [f"start = {pid} * BLOCK", "lane = tl.arange(0, BLOCK)", "offs = start + lane"]
    if not layout.even:
        lines.append("mask = offs < n")
    mask = "" if layout.even else ", mask=mask"
    index = _Index(layout, lines)
    for k, op in enumerate(prog.operands):
        at, block = index.of(k)
        # why: a scalar is loaded once and splat, so every body value is a [BLOCK] block (the interpreter
        # mishandles 0-d bools mixed with blocks); its address is the program's first element's, always valid
        load = f"tl.load(p{k} + {at}{mask})" if block else f"tl.broadcast_to(tl.load(p{k} + {at}), [BLOCK])"
        up = f".to({compute(op.dtype)})" if op.dtype in NARROW else ""
        lines.append(f"a{k} = {load}{up}")
    lines.extend(prog.lines)
    for j, r in enumerate(prog.results):
        at, _ = index.of(n_in + j)
        lines.append(f"tl.store(o{j} + {at}, {r.text}.to({storage(r.dtype)}){mask})")
    ops = ", ".join(sorted(set(prog.ops))) or "copy"
    return _HEADER.format(ops=ops, params=params) + "".join(f"    {line}\n" for line in lines)


def _arg_name(key: lay.Key) -> str:
    kind, a, b = key
    return f"inner{a}" if kind == "inner" else f"span{a}_{b}" if kind == "span" else f"stride{a}_{b}"


class _Index:
    """Offset expressions per operand (with whether they vary along the block); the quotients and remainders
    operands share become body variables once."""

    def __init__(self, layout: lay.Layout, lines: list[str]) -> None:
        self.layout = layout
        self.lines = lines
        self.done: set[str] = set()
        self.int = "tl.int64" if layout.wide else "tl.int32"

    def of(self, k: int) -> tuple[str, bool]:
        a = self.layout.accesses[k]
        if a.kind == "flat":
            return "offs", True
        if a.kind == "scalar":
            return "0", False
        terms = [self._term(k, j, t) for j, t in enumerate(a.terms)]
        return " + ".join(text for text, _ in terms), any(block for _, block in terms)

    def _term(self, k: int, j: int, t: lay.Term) -> tuple[str, bool]:
        if t.last == self.layout.rank - 1:
            name, block = (self._remainder(t) if t.first > 0 else "offs"), True
        else:
            name, block = self._quotient(t)
        return (name if t.unit else f"{name} * stride{k}_{j}"), block

    def _remainder(self, t: lay.Term) -> str:
        """offs % span for the innermost run."""
        r, span = f"r{t.first}_{t.last}", f"span{t.first}_{t.last}"
        if t.mode == "div":
            return self._var(r, f"offs % {span}")
        if t.mode == "fixed":  # start and span are multiples of BLOCK: no wrap inside the block
            return self._var(r, f"tl.multiple_of(start % {span}, BLOCK) + lane")
        w = self._var(f"{r}w", f"start % {span} + lane")
        return self._var(r, f"tl.where({w} >= {span}, {w} - {span}, {w})")

    def _quotient(self, t: lay.Term) -> tuple[str, bool]:
        """(offs // inner) % span, and whether it varies along the block."""
        q, inner = f"q{t.last}", f"inner{t.last}"
        r, span = f"r{t.first}_{t.last}", f"span{t.first}_{t.last}"
        if t.mode == "div":
            self._var(q, f"offs // {inner}")
            return (self._var(r, f"{q} % {span}") if t.first > 0 else q), True
        if t.mode == "fixed":  # the whole block has one quotient
            self._var(q, f"start // {inner}")
            return (self._var(r, f"{q} % {span}") if t.first > 0 else q), False
        base = self._var(f"{q}s", f"start // {inner}")
        carry = self._var(f"{q}c", f"(lane >= {inner} - start % {inner}).to({self.int})")
        if t.first == 0:
            return self._var(q, f"{base} + {carry}"), True
        w = self._var(f"{r}w", f"{base} % {span} + {carry}")
        return self._var(r, f"tl.where({w} == {span}, 0, {w})"), True

    def _var(self, name: str, text: str) -> str:
        if name not in self.done:
            self.done.add(name)
            self.lines.append(f"{name} = {text}")
        return name


# --- loading -------------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_KERNELS: dict[str, Any] = {}


def load(source: str) -> Any:
    """The `kiln_pointwise` Triton function of `source` (written to the cache directory once and imported), with
    programmatic dependent launch when it is on now (`kiln.kernels.pdl`)."""
    source = pdl.with_wait(source)
    key = hashlib.sha256(source.encode()).hexdigest()[:24]
    with _LOCK:
        fn = _KERNELS.get(key)
        if fn is None:
            fn = _KERNELS[key] = pdl.launcher(_import(source, f"kiln_pointwise_{key}").kiln_pointwise)
    return fn


def _import(source: str, name: str) -> Any:
    path = _write(source, name)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # why: Triton resolves the kernel's globals through its module
    spec.loader.exec_module(module)
    return module


def _write(source: str, name: str) -> Path:
    errors = []
    for root in (Path(env().cache_dir), Path(tempfile.gettempdir()) / "kiln"):
        path = root / "pointwise" / f"{name}.py"
        try:
            if not path.is_file() or path.read_text() != source:  # why: a crashed writer may leave a stub
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text(source)
                os.replace(tmp, path)
            return path
        except OSError as e:
            errors.append(f"{path}: {e}")
    raise KilnError(f"cannot write a generated pointwise kernel: {'; '.join(errors)}",
                    hint="set KILN_CACHE_DIR to a writable directory")


# --- the kernel ------------------------------------------------------------------------------------------------


class PointwiseKernel:
    """A graph of elementwise ops as one Triton kernel (see the module docstring).

    `__call__(inputs, out=None)`: `inputs` are the graph's input tensors, in order, on one device (inputs only
    used as Expand shapes may be anything); they are not modified. Outputs are new tensors of the domain's
    shape, in the memory order of the first full-shaped input (row-major unless that input is channels-last or
    otherwise permuted), or the given `out` tensors (one per graph output, the domain's shape and the output's dtype,
    any strides without overlap), which may alias an input of the same shape, dtype and strides. Safe to call
    from several threads: its caches hold only derived data, so a race at worst computes an entry twice.
    """

    def __init__(self, graph: Graph, *, block: int = 1024, num_warps: int = 4) -> None:
        if block <= 0 or block & (block - 1):
            raise ValueError(f"BLOCK must be a power of two, got {block}")
        self.program = build_program(graph)
        self.block = block
        self.num_warps = num_warps
        self.out_dtypes = [r.dtype for r in self.program.results]
        self._template = tuple(d if isinstance(d, int) else 1 for d in self.program.domain)
        self._grows = [tuple(d if isinstance(d, int) else 1 for d in s) for s in self.program.grows]
        self._reads = [op.input for op in self.program.operands if op.input is not None]
        self._n_inputs = max(self._reads, default=-1) + 1
        self._has_consts = any(op.data is not None for op in self.program.operands)
        self._consts: dict[torch.device, list[torch.Tensor]] = {}
        self._plans: dict[Any, _Planned] = {}
        self._fns: dict[lay.Layout, Any] = {}
        self.channels_last_outputs: tuple[bool, ...] = ()
        """Per graph output, whether a new output tensor is made channels-last (the layout the plan gives that value:
        an NCHW input's Cast into a channels-last region then transposes as it converts, in one pass)."""

    def source(self, layout: lay.Layout) -> str:
        return render(self.program, layout)

    def __call__(self, inputs: Sequence[torch.Tensor], out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        reads = self._operands(inputs)
        key = (*[(t.shape, t.stride(), t.dtype) for t in reads],
               self.channels_last_outputs if out is None else tuple((t.shape, t.stride(), t.dtype) for t in out))
        found = self._plans.get(key)
        if found is None:
            if len(self._plans) >= _MAX_PLANS:  # why: a model with dynamic shapes must not grow this forever
                self._plans.clear()
            found = self._plans[key] = self._plan(reads, out)
        domain, launch, fn = found
        if out is None:
            device = reads[0].device if reads else _device(inputs)
            outs = [_empty(domain, self._order(k, reads, domain), d.torch, device)
                    for k, d in enumerate(self.out_dtypes)]
        else:
            outs = list(out)
        if fn is not None:
            grid = (-(-launch.numel // self.block),)
            fn[grid](*reads, *outs, launch.numel, *launch.args, BLOCK=self.block, num_warps=self.num_warps)
        return outs

    def _operands(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) < self._n_inputs:
            raise InputError(f"pointwise kernel: {len(inputs)} inputs given, at least {self._n_inputs} expected")
        if not self._has_consts:
            return [inputs[i] for i in self._reads]
        it = iter(self._constants(_device(inputs)))
        return [inputs[op.input] if op.input is not None else next(it) for op in self.program.operands]

    def _constants(self, device: torch.device) -> list[torch.Tensor]:
        found = self._consts.get(device)
        if found is None:
            found = self._consts[device] = [op.data.to(device) for op in self.program.operands if op.data is not None]
        return found

    def _kernel(self, layout: lay.Layout) -> Any:
        fn = self._fns.get(layout)
        if fn is None:
            fn = self._fns[layout] = load(render(self.program, layout))
        return fn

    def _plan(self, reads: list[torch.Tensor], out: Sequence[torch.Tensor] | None) -> _Planned:
        for t, op in zip(reads, self.program.operands):
            if t.dtype != op.dtype.torch:
                raise InputError(f"pointwise kernel: an input has dtype {t.dtype}, the graph declares {op.dtype}")
        domain = self._domain(reads)
        if out is None:
            outs = [(domain, _strides(domain, self._order(k, reads, domain))) for k in range(len(self.out_dtypes))]
        else:
            self._check_out(out, domain)
            outs = [(tuple(t.shape), tuple(t.stride())) for t in out]
        ops = [(tuple(t.shape), tuple(t.stride())) for t in reads] + outs
        launch = lay.plan(domain, ops, self.block)
        return domain, launch, self._kernel(launch.layout) if launch.numel else None

    def _order(self, k: int, reads: Sequence[torch.Tensor], domain: tuple[int, ...]) -> list[int]:
        """The memory order of new output `k`."""
        if len(domain) == 4 and k < len(self.channels_last_outputs) and self.channels_last_outputs[k]:
            return [0, 2, 3, 1]
        return _output_order(reads, domain)

    def _domain(self, reads: list[torch.Tensor]) -> tuple[int, ...]:
        try:
            dom = tuple(torch.broadcast_shapes(self._template, *self._grows, *(tuple(t.shape) for t in reads)))
        except RuntimeError as e:
            raise InputError(f"pointwise kernel: inputs do not broadcast together: {e}") from None
        want = self.program.domain
        if len(dom) != len(want) or any(isinstance(w, int) and w != d for w, d in zip(want, dom)):
            raise InputError(f"pointwise kernel: inputs broadcast to {list(dom)}, the graph computes {list(want)}")
        return dom

    def _check_out(self, out: Sequence[torch.Tensor], domain: tuple[int, ...]) -> None:
        if len(out) != len(self.out_dtypes):
            raise InputError(f"pointwise kernel: {len(out)} out tensors for {len(self.out_dtypes)} outputs")
        for t, dt in zip(out, self.out_dtypes):
            if tuple(t.shape) != domain or t.dtype != dt.torch:
                raise InputError(f"pointwise kernel: out tensor {t.dtype}{list(t.shape)}, expected {dt}{list(domain)}")
            if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
                raise InputError("pointwise kernel: an out tensor overlaps itself (a zero stride)")


def _output_order(reads: Sequence[torch.Tensor], domain: tuple[int, ...]) -> list[int]:
    """The memory order new outputs get: that of the first input of the domain's full shape, when it is dense and
    not plain row-major (a channels-last activation gives channels-last results, so no conversion follows);
    row-major otherwise."""
    for t in reads:
        if tuple(t.shape) == domain and t.dim() > 1 and not t.is_contiguous() and _dense(t):
            return lay.memory_order(domain, t.stride())
    return list(range(len(domain)))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and without gaps, in some order of its dims."""
    order = lay.memory_order(t.shape, t.stride())
    expect = 1
    for d in reversed(order):
        if t.shape[d] != 1 and t.stride(d) != expect:
            return False
        expect *= t.shape[d]
    return True


def _strides(domain: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    inner = lay.contiguous([domain[d] for d in order])
    out = [0] * len(domain)
    for pos, d in enumerate(order):
        out[d] = inner[pos]
    return tuple(out)


def _empty(domain: tuple[int, ...], order: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if order == sorted(order):
        return torch.empty(domain, dtype=dtype, device=device)
    return torch.empty_strided(domain, _strides(domain, order), dtype=dtype, device=device)


_MAX_PLANS = 1024
_Planned = tuple[tuple[int, ...], lay.Launch, Any]
"""(domain, launch, the Triton function or None when there is nothing to compute)."""


def _device(inputs: Sequence[Any]) -> torch.device:
    """Where the kernel runs: the first input tensor's device (a graph of constants alone runs on CUDA)."""
    return next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cuda"))



# --- epilogues ---------------------------------------------------------------------------------------------------


def epilogue_graph(body: Graph) -> tuple[Graph, list[int]] | None:
    """The elementwise part of an epilogue body (body.nodes[0] is the Conv/Gemm/MatMul anchor) as a graph of its
    own: input 0 is the anchor's output ("acc"), inputs 1.. are the body inputs the steps read, and the list gives,
    for each of those, its index in `body.inputs`. Outputs are the body's. None when a step cannot be generated.

        g, idx = epilogue_graph(body)
        PointwiseKernel(g)([acc, *(xs[i] for i in idx)], out=[acc])   # the epilogue, in place on acc
    """
    if not body.nodes or len(body.nodes[0].outputs) != 1:
        return None
    acc = body.nodes[0].outputs[0]
    g = Graph(f"{body.name}.epilogue")
    mapping = {acc: g.add_input("acc", acc.type)}
    positions = {v: i for i, v in enumerate(body.inputs)}
    sources: list[int] = []

    def get(v: Value) -> Value | None:
        if v not in mapping:
            if v in positions:
                mapping[v] = g.add_input(v.name, v.type)
                sources.append(positions[v])
            elif isinstance(v.data, torch.Tensor):
                mapping[v] = g.add_initializer(v.name, v.data, v.dtype)
            else:
                return None
        return mapping[v]

    for n in body.nodes[1:]:
        ins = [None if v is None else get(v) for v in n.inputs]
        if any(m is None and v is not None for m, v in zip(ins, n.inputs)):
            return None
        outs = [Value(g.fresh_name(o.name), o.type) for o in n.outputs]
        g.insert_node(Node(n.op, ins, outs, dict(n.attrs), n.name))
        mapping.update(zip(n.outputs, outs))
    results = [get(v) for v in body.outputs]
    if any(r is None for r in results):
        return None
    g.outputs = [r for r in results if r is not None]
    return (g, sources) if supports(g) else None

