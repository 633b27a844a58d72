"""Op table entries: strings (numpy object arrays of Python str) and n-gram counting (TfIdfVectorizer)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import TensorType, ValueType
from kiln.ir.ops.base import REQUIRED, Attr, AttrKind, InferCtx, RefCtx, broadcast_shapes, register
from kiln.utils.errors import ExecutionError


def _strings(ctx: InferCtx, i: int) -> TensorType:
    t = ctx.tensor(i)
    if t.dtype is not DType.STRING:
        raise ctx.error(f"input {i} must be a string tensor, got {t.dtype}")
    return t


def _str_array(shape: tuple[int, ...], items: list[str]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


# --- StringConcat -------------------------------------------------------------------------------------


def _concat_infer(ctx: InferCtx) -> list[ValueType]:
    a, b = _strings(ctx, 0), _strings(ctx, 1)
    return [TensorType(DType.STRING, broadcast_shapes(ctx, a.shape, b.shape))]


def _concat_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    a, b = np.broadcast_arrays(xs[0], xs[1])
    return [_str_array(a.shape, [x + y for x, y in zip(a.reshape(-1), b.reshape(-1))])]


register("StringConcat", inputs=["X", "Y"], outputs=["Z"], infer=_concat_infer, ref=_concat_ref,
         doc="Elementwise concatenation of two string tensors, with broadcasting.")


# --- StringSplit --------------------------------------------------------------------------------------


def _split_infer(ctx: InferCtx) -> list[ValueType]:
    t = _strings(ctx, 0)
    if ctx.attrs["maxsplit"] is not None and ctx.attrs["maxsplit"] < 0:
        raise ctx.error(f"maxsplit must be non-negative, got {ctx.attrs['maxsplit']}")
    parts = None if t.shape is None else (*t.shape, ctx.fresh("substrings"))
    return [TensorType(DType.STRING, parts), TensorType(DType.INT64, t.shape)]


def _split_one(s: str, delimiter: str | None, maxsplit: int) -> list[str]:
    # An empty or absent delimiter splits on runs of whitespace, ignoring leading and trailing whitespace.
    return s.split(delimiter or None, maxsplit)


def _split_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    maxsplit = c.attrs["maxsplit"]
    limit = -1 if maxsplit is None else maxsplit
    pieces = [_split_one(s, c.attrs["delimiter"], limit) for s in x.reshape(-1)]
    width = max((len(p) for p in pieces), default=0)
    padded = [s for p in pieces for s in p + [""] * (width - len(p))]
    counts = torch.tensor([len(p) for p in pieces], dtype=torch.int64).reshape(x.shape)
    return [_str_array((*x.shape, width), padded), counts]


register(
    "StringSplit", inputs=["X"], outputs=["Y", "Z"], infer=_split_infer, ref=_split_ref,
    attrs={"delimiter": Attr(AttrKind.STRING, None), "maxsplit": Attr(AttrKind.INT, None)},
    doc="Splits each string on `delimiter` (whitespace runs when empty), at most `maxsplit` times. Y pads "
        "the substrings with empty strings to a common count; Z holds each element's count.",
)


# --- RegexFullMatch -----------------------------------------------------------------------------------


def _regex(ctx: InferCtx | RefCtx) -> re.Pattern[str]:
    pattern = ctx.attrs["pattern"]
    try:
        return re.compile(pattern)
    except re.error as e:
        msg = f"node '{ctx.node.name}' (RegexFullMatch): invalid pattern {pattern!r}: {e}"
        raise ExecutionError(msg) from None


def _regex_infer(ctx: InferCtx) -> list[ValueType]:
    t = _strings(ctx, 0)
    _regex(ctx)
    return [TensorType(DType.BOOL, t.shape)]


def _regex_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    rx = _regex(c)
    flat = [rx.fullmatch(s) is not None for s in xs[0].reshape(-1)]
    return [torch.tensor(flat, dtype=torch.bool).reshape(xs[0].shape)]


register("RegexFullMatch", inputs=["X"], outputs=["Y"], infer=_regex_infer, ref=_regex_ref,
         attrs={"pattern": Attr(AttrKind.STRING, REQUIRED)},
         doc="Whether each string matches `pattern` as a whole (RE2 syntax; the common subset of Python re).")


# --- StringNormalizer ---------------------------------------------------------------------------------


def _normalizer_infer(ctx: InferCtx) -> list[ValueType]:
    t = _strings(ctx, 0)
    if t.shape is not None and not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[0] == 1)):
        raise ctx.error(f"the input must be [C] or [1, C], got {t}")
    if not ctx.attrs["stopwords"] or t.shape is None:
        return [t]
    kept = ctx.fresh("kept")
    return [TensorType(DType.STRING, (kept,) if len(t.shape) == 1 else (1, kept))]


def _normalizer_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    sensitive = bool(c.attrs["is_case_sensitive"])
    stop = set(c.attrs["stopwords"] or ())
    if not sensitive:
        stop = {s.lower() for s in stop}
    kept = [s for s in x.reshape(-1) if (s if sensitive else s.lower()) not in stop]
    action = c.attrs["case_change_action"]
    if action == "LOWER":
        kept = [s.lower() for s in kept]
    elif action == "UPPER":
        kept = [s.upper() for s in kept]
    if not kept and x.size:
        kept = [""]
    return [_str_array((len(kept),) if x.ndim == 1 else (1, len(kept)), kept)]


register(
    "StringNormalizer", inputs=["X"], outputs=["Y"], infer=_normalizer_infer, ref=_normalizer_ref,
    attrs={
        "case_change_action": Attr(AttrKind.STRING, "NONE", choices=("NONE", "LOWER", "UPPER")),
        "is_case_sensitive": Attr(AttrKind.INT, 0, choices=(0, 1)),
        "locale": Attr(AttrKind.STRING, None, doc="only locales whose case rules are Unicode's default"),
        "stopwords": Attr(AttrKind.STRINGS, None),
    },
    doc="Drops stopwords from a [C] or [1, C] string tensor, then changes case. If nothing is left, the "
        "result is one empty string.",
)


# --- TfIdfVectorizer ----------------------------------------------------------------------------------


def _pool(attrs: dict[str, Any]) -> tuple[list[Any], bool]:
    ints, strs = attrs["pool_int64s"], attrs["pool_strings"]
    if (ints is None) == (strs is None):
        raise ValueError("exactly one of pool_int64s and pool_strings must be given")
    return (list(ints), False) if ints is not None else (list(strs), True)


def _tfidf_check(ctx: InferCtx) -> None:
    a = ctx.attrs
    try:
        pool, strings = _pool(a)
    except ValueError as e:
        raise ctx.error(str(e)) from None
    counts, indexes = a["ngram_counts"], a["ngram_indexes"]
    for n, (start, end) in enumerate(zip(counts, [*counts[1:], len(pool)]), start=1):
        if not 0 <= start <= end <= len(pool) or (end - start) % n:
            raise ctx.error(f"pool items {start}..{end} do not make whole {n}-grams "
                            f"(ngram_counts={list(counts)})")
    n_grams = sum(_gram_groups(counts, len(pool)))
    if len(indexes) != n_grams:
        raise ctx.error(f"ngram_indexes has {len(indexes)} entries, the pool holds {n_grams} n-grams")
    if a["weights"] is not None and len(a["weights"]) != n_grams:
        raise ctx.error(f"weights has {len(a['weights'])} entries, the pool holds {n_grams} n-grams")
    if not 1 <= a["min_gram_length"] <= a["max_gram_length"] or a["max_skip_count"] < 0:
        raise ctx.error("need 1 <= min_gram_length <= max_gram_length and max_skip_count >= 0")
    dt = ctx.dtype(0)
    if strings != (dt is DType.STRING) or (not strings and dt not in (DType.INT32, DType.INT64)):
        raise ctx.error(f"a {'string' if strings else 'int64'} pool cannot count {dt} input")


def _gram_groups(counts: tuple[int, ...], total: int) -> list[int]:
    """How many n-grams of each length (1, 2, ...) the pool holds, from the starts in ngram_counts."""
    ends = [*counts[1:], total]
    return [(end - start) // (n + 1) for n, (start, end) in enumerate(zip(counts, ends))]


def _tfidf_infer(ctx: InferCtx) -> list[ValueType]:
    _tfidf_check(ctx)
    width = max(ctx.attrs["ngram_indexes"], default=-1) + 1
    shape = ctx.shape(0)
    if shape is not None and len(shape) not in (1, 2):
        raise ctx.error(f"the input must be [C] or [N, C], got rank {len(shape)}")
    if shape is None:
        return [TensorType(DType.FLOAT32, None)]
    return [TensorType(DType.FLOAT32, (width,) if len(shape) == 1 else (shape[0], width))]


def _encode(values: np.ndarray, pool: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Input and pool as int64 codes of one vocabulary (strings and ints alike)."""
    pool_arr = np.array(pool, dtype=object if values.dtype == object else np.int64)
    both = np.concatenate([pool_arr, values.reshape(-1).astype(pool_arr.dtype)])
    _, codes = np.unique(both, return_inverse=True)
    codes = codes.astype(np.int64)
    return codes[len(pool):].reshape(values.shape), codes[:len(pool)]


def _gram_ids(grams: np.ndarray, pool_grams: np.ndarray) -> np.ndarray:
    """For each row of `grams` ([P, n]), the index of the equal row of `pool_grams` ([G, n]), or -1."""
    both = np.concatenate([pool_grams, grams])
    _, inv = np.unique(both, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    first: dict[int, int] = {}
    for i, code in enumerate(inv[:len(pool_grams)].tolist()):
        first.setdefault(code, i)
    lookup = np.full(int(inv.max()) + 1 if inv.size else 1, -1, dtype=np.int64)
    for code, i in first.items():
        lookup[code] = i
    return lookup[inv[len(pool_grams):]]


def _tfidf_counts(rows: np.ndarray, pool_codes: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """Counts [N, n_grams] of each pool n-gram in each row, over every skip up to max_skip_count."""
    n_rows, width = rows.shape
    groups = _gram_groups(attrs["ngram_counts"], len(pool_codes))
    counts = np.zeros((n_rows, sum(groups)), dtype=np.int64)
    gram_base = 0
    for n, (start, count) in enumerate(zip(attrs["ngram_counts"], groups), start=1):
        if count and attrs["min_gram_length"] <= n <= attrs["max_gram_length"]:
            pool_grams = pool_codes[start:start + n * count].reshape(count, n)
            # Unigrams are counted once: a skip does not change them.
            for skip in range(attrs["max_skip_count"] + 1 if n > 1 else 1):
                step = skip + 1
                starts = width - (n - 1) * step
                if starts <= 0:
                    break
                idx = np.arange(starts)[:, None] + step * np.arange(n)[None, :]
                grams = rows[:, idx].reshape(-1, n)
                ids = _gram_ids(grams, pool_grams).reshape(n_rows, starts)
                row = np.broadcast_to(np.arange(n_rows)[:, None], ids.shape)
                hit = ids >= 0
                np.add.at(counts, (row[hit], gram_base + ids[hit]), 1)
        gram_base += count
    return counts


def _tfidf_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    a = c.attrs
    x = xs[0]
    # n-gram matching over strings or integers: numpy, on the host (a numeric input comes back to its device).
    device = torch.device("cpu") if isinstance(x, np.ndarray) else x.device
    values = x if isinstance(x, np.ndarray) else x.cpu().numpy()
    pool, _ = _pool(a)
    rows = values.reshape(1, -1) if values.ndim == 1 else values
    width = max(a["ngram_indexes"], default=-1) + 1
    out = np.zeros((rows.shape[0], width), dtype=np.float32)
    if rows.size:
        codes, pool_codes = _encode(rows, pool)
        counts = _tfidf_counts(codes, pool_codes, a).astype(np.float32)
        weights = np.array(a["weights"] or [1.0] * counts.shape[1], np.float32)
        if a["mode"] == "IDF":
            counts = (counts > 0).astype(np.float32) * weights
        elif a["mode"] == "TFIDF":
            counts = counts * weights
        columns = np.array(a["ngram_indexes"], dtype=np.int64)
        np.add.at(out, (np.arange(out.shape[0])[:, None], columns[None, :]), counts)
    return [torch.from_numpy(out.reshape(width) if values.ndim == 1 else out).to(device)]


register(
    "TfIdfVectorizer", inputs=["X"], outputs=["Y"], infer=_tfidf_infer, ref=_tfidf_ref,
    attrs={
        "mode": Attr(AttrKind.STRING, REQUIRED, choices=("TF", "IDF", "TFIDF")),
        "min_gram_length": Attr(AttrKind.INT),
        "max_gram_length": Attr(AttrKind.INT),
        "max_skip_count": Attr(AttrKind.INT),
        "ngram_counts": Attr(AttrKind.INTS),
        "ngram_indexes": Attr(AttrKind.INTS),
        "pool_int64s": Attr(AttrKind.INTS, None),
        "pool_strings": Attr(AttrKind.STRINGS, None),
        "weights": Attr(AttrKind.FLOATS, None),
    },
    doc="Counts the pool's n-grams (lengths min..max, gaps up to max_skip_count) in each row of a [C] or "
        "[N, C] input; IDF and TFIDF weight the counts (the i-th weight goes with the pool's i-th n-gram).",
)
