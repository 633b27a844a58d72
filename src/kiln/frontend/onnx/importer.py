"""ONNX ModelProto (or a path, or bytes) -> kiln Graph.

Each node goes to the handler registered for its op and op version (`handlers/`); an op with no handler maps
onto the kiln op of the same name (attributes checked by the op table's schema); an op kiln lacks but ONNX
defines as a function is expanded into its body; model-local functions are inlined. Unsupported input raises
an UnsupportedError naming the node, op, opset and reason, or, in collect mode (`kiln check`), is recorded and
the import goes on so that every problem is found in one pass.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx
from google.protobuf.message import DecodeError
from onnx import AttributeProto

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import default_handler, find_handler
from kiln.frontend.onnx.tensors import read_tensor, sparse_to_dense, type_from_onnx, type_to_onnx
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, TensorType, Value, ValueType
from kiln.ir.ops import OPS
from kiln.utils.errors import GraphError, KilnError, ModelLoadError, UnsupportedError

MAX_OPSET = 28
"""The newest default-domain opset kiln is tested against (the ONNX backend suite of onnx 1.23)."""


def max_opset() -> int:
    return min(MAX_OPSET, onnx.defs.onnx_opset_version())


@dataclass
class Problem:
    """One thing `kiln check` reports."""

    severity: str  # "error" (not supported) or "warning" (supported, but worth knowing)
    reason: str
    op: str = ""
    node: str = ""
    opset: int | None = None
    domain: str = ""

    def __str__(self) -> str:
        op = f"{self.domain}::{self.op}" if self.domain else self.op
        where = f"{op or '-'} (opset {self.opset})" if self.opset else (op or "model")
        return f"{self.severity:7s} {where:32s} {self.node or '-':28s} {self.reason}"


class Scope:
    """ONNX value names visible at a point of import; subgraphs see enclosing scopes."""

    def __init__(self, parent: Scope | None = None) -> None:
        self.names: dict[str, Value | None] = {}
        self.parent = parent

    def lookup(self, name: str) -> Value | None:
        s: Scope | None = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        try:
            self.lookup(name)
            return True
        except KeyError:
            return False


def load_model(src: str | os.PathLike[str] | bytes | onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Read a model without its external data (kiln reads that itself, with clear errors)."""
    if isinstance(src, onnx.ModelProto):
        return src, None
    if isinstance(src, (bytes, bytearray)):
        return _parse(bytes(src), "<bytes>"), None
    path = os.fspath(src)
    if not os.path.exists(path):
        raise ModelLoadError(f"model file '{path}' not found")
    if os.path.isdir(path):
        raise ModelLoadError(f"'{path}' is a directory, not an ONNX model file")
    with open(path, "rb") as f:
        data = f.read()
    return _parse(data, path), os.path.dirname(os.path.abspath(path))


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"'{where}' is empty")
    m = onnx.ModelProto()
    try:
        m.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(
            f"'{where}' is not a valid ONNX model ({e})",
            hint="the file may be truncated, or not an ONNX file at all",
        ) from None
    if not m.HasField("graph") or (not m.graph.node and not m.graph.output):
        raise ModelLoadError(
            f"'{where}' has no graph: it is not an ONNX model, or it is truncated",
            hint="check the file was copied completely (compare its size with the original)",
        )
    return m


def import_model(src: str | os.PathLike[str] | bytes | onnx.ModelProto) -> Graph:
    """Import an ONNX model. Raises a KilnError subclass naming what is wrong."""
    model, base_dir = load_model(src)
    return Importer(model, base_dir).run()


class Importer:
    def __init__(self, model: onnx.ModelProto, base_dir: str | None, *, collect: bool = False) -> None:
        self.model = model
        self.base_dir = base_dir
        self.collect = collect
        self.problems: list[Problem] = []
        self.functions = {(f.domain or "", f.name): f for f in model.functions}
        self.opsets = {(d.domain if d.domain != "ai.onnx" else ""): int(d.version) for d in model.opset_import}
        if "" not in self.opsets and model.ir_version < 3:
            self.opsets[""] = 1  # very old models carry no opset import
        self._current_opsets = self.opsets
        self._inline_depth = 0

    # --- entry points -------------------------------------------------------------------------------

    def run(self) -> Graph:
        self._check_opsets()
        g = Graph(self.model.graph.name or "main")
        g.opset = self.opsets.get("")
        g.reserve([vi.name for vi in self.model.graph.input] + [vi.name for vi in self.model.graph.output])
        for p in self.model.metadata_props:
            g.metadata[p.key] = p.value
        if self.model.producer_name:
            g.metadata.setdefault("producer", f"{self.model.producer_name} {self.model.producer_version}".strip())
        self._import_graph(self.model.graph, g, Scope(), None, self.opsets)
        return g

    def import_subgraph(
        self,
        gp: onnx.GraphProto,
        parent: Graph,
        scope: Scope,
        input_types: Sequence[ValueType | None] | None,
        name: str,
    ) -> Graph:
        g = Graph(name, parent=parent)
        self._import_graph(gp, g, Scope(scope), input_types, self._current_opsets)
        return g

    # --- problems -----------------------------------------------------------------------------------

    def _report(self, err: KilnError, severity: str = "error", **where: Any) -> None:
        if not self.collect:
            raise err
        if isinstance(err, UnsupportedError):
            self.problems.append(Problem(severity, err.reason if not err.hint else f"{err.reason} ({err.hint})",
                                         err.op or where.get("op", ""), err.node or where.get("node", ""),
                                         err.opset or where.get("opset"), err.domain or where.get("domain", "")))
        else:
            self.problems.append(Problem(severity, err.message, where.get("op", ""), where.get("node", ""),
                                         where.get("opset"), where.get("domain", "")))

    def warn(self, reason: str, **where: Any) -> None:
        if self.collect:
            self.problems.append(Problem("warning", reason, where.get("op", ""), where.get("node", ""),
                                         where.get("opset"), where.get("domain", "")))

    def _check_opsets(self) -> None:
        v = self.opsets.get("")
        top = max_opset()
        if v is not None and v > top:
            self._report(UnsupportedError(
                f"the model uses ONNX opset {v}; kiln supports opsets 1 to {top}",
                hint=f"re-export the model with opset {top} or lower (torch.onnx.export(..., opset_version={top}))",
            ))
            self.opsets[""] = top

    # --- graphs -------------------------------------------------------------------------------------

    def _import_graph(
        self,
        gp: onnx.GraphProto,
        g: Graph,
        scope: Scope,
        input_types: Sequence[ValueType | None] | None,
        opsets: dict[str, int],
    ) -> None:
        self._current_opsets = opsets
        init_names = {t.name for t in gp.initializer} | {s.values.name for s in gp.sparse_initializer}
        for t in gp.initializer:
            self._add_initializer(g, scope, t.name, lambda t=t: read_tensor(t, self.base_dir))
        for s in gp.sparse_initializer:
            self._add_initializer(g, scope, s.values.name, lambda s=s: sparse_to_dense(s, self.base_dir))
        graph_inputs = [vi for vi in gp.input if vi.name not in init_names]
        if input_types is not None and len(input_types) != len(graph_inputs):
            raise GraphError(f"graph '{g.name}' declares {len(graph_inputs)} inputs, its op passes "
                             f"{len(input_types)}")
        for i, vi in enumerate(graph_inputs):
            given = input_types[i] if input_types is not None else None
            t = given if given is not None else self._declared_type(vi, g, f"input '{vi.name}'")
            if t is None:
                t = TensorType(DType.FLOAT32, None)
            v = g.add_input(vi.name, t)
            scope.names[vi.name] = v
        for node in _topological(gp, scope):
            self._import_node(node, g, scope, opsets)
        for vi in gp.output:
            try:
                out = scope.lookup(vi.name)
            except KeyError:
                self._report(GraphError(
                    f"graph output '{vi.name}' is not computed by any node",
                    hint="the file may be truncated or the model malformed",
                ))
                continue
            if out is None:
                continue
            if out.name != vi.name or out in g.outputs:
                # Graph outputs keep their ONNX names even when they alias another value.
                out = g.add("Identity", [out], name=g.fresh_name(f"{vi.name}_identity"), outputs=[vi.name])[0]
            g.outputs.append(out)

    def _add_initializer(self, g: Graph, scope: Scope, name: str, read: Any) -> None:
        try:
            data, dtype = read()
        except KilnError as e:
            self._report(e)
            scope.names[name] = None
            return
        v = g.add_initializer(name, data, dtype)
        scope.names[name] = v

    def _declared_type(self, vi: onnx.ValueInfoProto, g: Graph, what: str) -> ValueType | None:
        if not vi.type.WhichOneof("value"):
            return None
        try:
            return type_from_onnx(vi.type, lambda: g.fresh_dim(sanitize_hint(vi.name)), what)
        except UnsupportedError as e:
            self._report(e)
            return None

    # --- nodes --------------------------------------------------------------------------------------

    def _import_node(self, node: onnx.NodeProto, g: Graph, scope: Scope, opsets: dict[str, int]) -> None:
        domain = node.domain if node.domain != "ai.onnx" else ""
        name = node.name or f"{node.op_type}"
        where = {"op": node.op_type, "node": name, "domain": domain}
        inputs: list[Value | None] = []
        broken = False
        for i, inp in enumerate(node.input):
            if not inp:
                inputs.append(None)
                continue
            try:
                v = scope.lookup(inp)
            except KeyError:
                self._report(GraphError(
                    f"node '{name}' ({node.op_type}) reads '{inp}' (input {i}), which no node, graph input or "
                    f"initializer produces",
                    hint="the file may be truncated, or nodes are missing",
                ), **where)
                v = None
            broken |= v is None
            inputs.append(v)
        if (domain, node.op_type) in self.functions:
            self._inline_function(node, self.functions[(domain, node.op_type)], g, scope, inputs, broken)
            return
        version = opsets.get(domain)
        if version is None:
            self._fail_node(node, g, scope, UnsupportedError(
                f"the model does not import the '{domain}' domain", op=node.op_type, node=name, domain=domain))
            return
        try:
            since = self._since(node.op_type, domain, version, name)
            attrs = self._attrs(node)
            if broken:  # an input could not be imported; keep going for `kiln check` without inference
                raise _Skip()
            ctx = NodeCtx(self, node, g, scope, inputs, attrs, version, since)
            handler = find_handler(domain, node.op_type, since)
            if handler is None and domain == "" and node.op_type in OPS:
                handler = default_handler
            if handler is None:
                body = self._schema_function(node, inputs, version, domain)
                if body is not None:
                    self._inline_function(node, body, g, scope, inputs, False, schema_since=since)
                    return
                raise ctx.fail("kiln has no implementation of this op" if domain in ("", "ai.onnx.ml")
                               else f"custom domain '{domain}' is not supported",
                               hint=None if domain else "run `kiln check` for the full list; please file an issue")
            self._current_opsets = opsets
            outs = list(handler(ctx))
        except _Skip:
            self._stand_in(node, g, scope)
            return
        except KilnError as e:
            if isinstance(e, UnsupportedError) and e.op is None:
                e = UnsupportedError(e.reason, op=node.op_type, node=name, opset=version, domain=domain, hint=e.hint)
            self._fail_node(node, g, scope, e)
            return
        for out_name, v in zip(node.output, outs):
            if out_name:
                scope.names[out_name] = v
        for out_name in node.output[len(outs):]:
            if out_name:
                self._fail_node(node, g, scope, UnsupportedError(
                    f"output '{out_name}' is not produced by kiln's handler", op=node.op_type, node=name,
                    opset=version, domain=domain))
                return

    def _fail_node(self, node: onnx.NodeProto, g: Graph, scope: Scope, err: KilnError) -> None:
        self._report(err, op=node.op_type, node=node.name, domain=node.domain)
        self._stand_in(node, g, scope)

    def _stand_in(self, node: onnx.NodeProto, g: Graph, scope: Scope) -> None:
        """In collect mode, give a failed node's outputs placeholder values so the rest can be checked."""
        for out in node.output:
            if out:
                scope.names[out] = None

    def _since(self, op_type: str, domain: str, version: int, name: str) -> int:
        try:
            return int(onnx.defs.get_schema(op_type, version, domain).since_version)
        except onnx.defs.SchemaError:
            if find_handler(domain, op_type, version) is not None:
                return 1  # an op onnx does not define (onnxruntime's contrib ops): one handler for every version
            if domain == "" and op_type in OPS:
                raise UnsupportedError(f"{op_type} is not defined in ONNX opset {version}", op=op_type, node=name,
                                       opset=version) from None
            raise UnsupportedError(
                "unknown op" if domain == "" else f"unknown op in domain '{domain}'",
                op=op_type, node=name, opset=version, domain=domain,
            ) from None

    def _attrs(self, node: onnx.NodeProto) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a in node.attribute:
            if a.ref_attr_name:
                raise UnsupportedError(f"attribute '{a.name}' refers to '{a.ref_attr_name}' outside a function",
                                       op=node.op_type, node=node.name)
            out[a.name] = self._attr_value(a, node)
        return out

    def _attr_value(self, a: AttributeProto, node: onnx.NodeProto) -> Any:
        T = AttributeProto
        if a.type == T.TENSOR:
            return read_tensor(a.t, self.base_dir)[0]
        if a.type == T.SPARSE_TENSOR:
            return sparse_to_dense(a.sparse_tensor, self.base_dir)[0]
        if a.type == T.TENSORS:
            return [read_tensor(t, self.base_dir)[0] for t in a.tensors]
        if a.type == T.STRING:
            return a.s.decode("utf-8", errors="replace")
        if a.type == T.STRINGS:
            return tuple(s.decode("utf-8", errors="replace") for s in a.strings)
        if a.type == T.GRAPH:
            return a.g
        if a.type == T.GRAPHS:
            return list(a.graphs)
        if a.type == T.TYPE_PROTO:
            return a.tp
        if a.type == T.INTS:
            return tuple(int(x) for x in a.ints)
        if a.type == T.FLOATS:
            return tuple(float(x) for x in a.floats)
        if a.type == T.INT:
            return int(a.i)
        if a.type == T.FLOAT:
            return float(a.f)
        if a.type == T.UNDEFINED:
            # Older exporters leave the type unset; infer it from the populated field.
            return onnx.helper.get_attribute_value(a)
        raise UnsupportedError(f"attribute '{a.name}' has an unsupported type", op=node.op_type, node=node.name)

    # --- functions ----------------------------------------------------------------------------------

    def _schema_function(
        self, node: onnx.NodeProto, inputs: list[Value | None], version: int, domain: str
    ) -> onnx.FunctionProto | None:
        """The function body ONNX defines for an op (plain or context-dependent), if any. A body carries its own
        opset imports, so one written for a newer opset still expands correctly."""
        try:
            schema: Any = onnx.defs.get_schema(node.op_type, version, domain)  # function APIs lack type stubs
        except onnx.defs.SchemaError:
            return None
        plain = _pick_version(schema.function_opset_versions, version)
        if plain is not None:
            return onnx.FunctionProto.FromString(schema.get_function_with_opset_version(plain))
        ctx_version = _pick_version(schema.context_dependent_function_opset_versions, version)
        if ctx_version is not None:
            types = [type_to_onnx(v.type).SerializeToString() if v is not None else onnx.TypeProto().SerializeToString()
                     for v in inputs]
            try:
                raw = schema.get_context_dependent_function_with_opset_version(
                    ctx_version, node.SerializeToString(), types)
            except Exception:
                return None
            return onnx.FunctionProto.FromString(raw) if raw else None
        return None

    def _inline_function(
        self,
        node: onnx.NodeProto,
        fn: onnx.FunctionProto,
        g: Graph,
        scope: Scope,
        inputs: list[Value | None],
        broken: bool,
        schema_since: int | None = None,
    ) -> None:
        name = node.name or node.op_type
        if self._inline_depth > 32:
            self._report(UnsupportedError("functions nest more than 32 deep (recursive?)", op=node.op_type,
                                          node=name))
            self._stand_in(node, g, scope)
            return
        outer_opsets = self._current_opsets
        fn_opsets = dict(outer_opsets)
        for d in fn.opset_import:
            fn_opsets[d.domain if d.domain != "ai.onnx" else ""] = int(d.version)
        caller = {a.name: a for a in node.attribute}
        defaults = {a.name: a for a in getattr(fn, "attribute_proto", [])}
        if schema_since is not None:
            schema = onnx.defs.get_schema(node.op_type, self.opsets.get(node.domain or "", 1), node.domain or "")
            for an, spec in schema.attributes.items():
                if spec.default_value is not None and spec.default_value.type != AttributeProto.UNDEFINED:
                    d = AttributeProto()
                    d.CopyFrom(spec.default_value)
                    d.name = an
                    defaults.setdefault(an, d)
        inner = Scope()
        for formal, actual in zip(fn.input, list(inputs) + [None] * len(fn.input)):
            inner.names[formal] = actual
        self._inline_depth += 1
        try:
            for fnode in fn.node:
                self._import_node(_substitute(fnode, caller, defaults, name), g, inner, fn_opsets)
        finally:
            self._inline_depth -= 1
            self._current_opsets = outer_opsets
        for formal, actual in zip(fn.output, node.output):
            if actual:
                try:
                    scope.names[actual] = inner.lookup(formal)
                except KeyError:
                    self._report(GraphError(f"function {fn.name} does not compute its output '{formal}'"),
                                 op=node.op_type, node=name)
                    scope.names[actual] = None


class _Skip(Exception):
    pass


def _pick_version(versions: Sequence[int], opset: int) -> int | None:
    """The newest body written for an opset <= the model's, else the oldest there is."""
    vs = sorted(versions)
    if not vs:
        return None
    older = [v for v in vs if v <= opset]
    return older[-1] if older else vs[0]


def sanitize_hint(name: str) -> str:
    from kiln.ir.symbolic import sanitize

    return sanitize(name)[:24]


def _substitute(fnode: onnx.NodeProto, caller: dict[str, AttributeProto], defaults: dict[str, AttributeProto],
                prefix: str) -> onnx.NodeProto:
    """A function body node with attribute references resolved and a name unique to this call."""
    n = onnx.NodeProto()
    n.CopyFrom(fnode)
    n.name = f"{prefix}/{fnode.name or fnode.op_type}"
    kept = []
    for a in n.attribute:
        if a.ref_attr_name:
            src = caller.get(a.ref_attr_name) or defaults.get(a.ref_attr_name)
            if src is None:
                continue  # not given and no default: the attribute is absent
            b = AttributeProto()
            b.CopyFrom(src)
            b.name = a.name
            kept.append(b)
        else:
            kept.append(a)
    del n.attribute[:]
    n.attribute.extend(kept)
    return n


def _topological(gp: onnx.GraphProto, scope: Scope) -> list[onnx.NodeProto]:
    """Nodes in an order where producers come first (ONNX requires it; some exporters get it wrong)."""
    nodes = list(gp.node)
    produced = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    in_order = True
    for i, n in enumerate(nodes):
        for inp in _node_reads(n):
            j = produced.get(inp)
            if j is not None and j > i:
                in_order = False
                break
        if not in_order:
            break
    if in_order:
        return nodes
    order: list[onnx.NodeProto] = []
    state = [0] * len(nodes)

    def visit(i: int) -> None:
        stack = [(i, iter(_node_reads(nodes[i])))]
        state[i] = 1
        while stack:
            k, it = stack[-1]
            for inp in it:
                j = produced.get(inp)
                if j is not None and state[j] == 0:
                    state[j] = 1
                    stack.append((j, iter(_node_reads(nodes[j]))))
                    break
                if j is not None and state[j] == 1 and j != k:
                    raise GraphError(f"the graph has a cycle through node '{nodes[j].name or nodes[j].op_type}'")
            else:
                stack.pop()
                state[k] = 2
                order.append(nodes[k])

    for i in range(len(nodes)):
        if state[i] == 0:
            visit(i)
    return order


def _node_reads(n: onnx.NodeProto) -> list[str]:
    names = [i for i in n.input if i]
    for a in n.attribute:
        graphs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs)
        for sg in graphs:
            local = {o for sn in sg.node for o in sn.output} | {i.name for i in sg.input} | \
                    {t.name for t in sg.initializer}
            for sn in sg.node:
                names.extend(x for x in _node_reads(sn) if x not in local)
    return names
