"""The HTML report of `kiln inspect --html`: one self-contained file (inline CSS and SVG, no script, no network)
with the engine's summary, the memory plan, a per-layer time chart (with --profile) and the table of steps."""

from __future__ import annotations

from html import escape
from typing import Any

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1d2330}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse} td,th{padding:3px 10px;border-bottom:1px solid #e3e6ec;text-align:left;
vertical-align:top} th{background:#f3f5f8;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.kv td:first-child{color:#5b6475} .muted{color:#7a8294} code{font-size:12px}
svg text{font:11px system-ui,sans-serif;fill:#1d2330}
"""
BAR_H = 16
LABEL_W = 260
CHART_W = 520


def render(r: dict[str, Any]) -> str:
    meta = r["metadata"]
    title = f"kiln engine: {meta.get('model', {}).get('source', r['file'])}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{escape(title)}</h1><div class='muted'>{escape(r['file'])}</div>",
             _summary(r), _memory(r["memory"]), _chart(r), _table(r), "</body></html>"]
    return "\n".join(parts)


def _kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _summary(r: dict[str, Any]) -> str:
    meta = r["metadata"]
    dev, cfg, vers = meta.get("device", {}), meta.get("config", {}), meta.get("versions", {})
    rows = [
        ("size", f"{r['size_bytes']:,} bytes"),
        ("built", f"{meta.get('created', 'no timestamp')} with kiln {vers.get('kiln')}, torch {vers.get('torch')}"),
        ("device", f"{dev.get('name', '?')} ({dev.get('arch', '?')})"),
        ("config", f"{cfg.get('precision')}, tf32 {'on' if cfg.get('tf32') else 'off'}, "
                   f"opt level {cfg.get('opt_level')}"),
        ("inputs", ", ".join(f"{v['name']} {v['type']}" for v in r["inputs"])),
        ("outputs", ", ".join(f"{v['name']} {v['type']}" for v in r["outputs"])),
        ("layers", f"{len(r['layers'])} ({r['stats'].get('nodes_imported', '?')} imported)"),
    ]
    for k, p in enumerate(r["profiles"]):
        rows.append((f"profile {k}", ", ".join(f"{n}: min {s['min']} opt {s['opt']} max {s['max']}"
                                               for n, s in p.items()) or "static shapes"))
    if "profile" in r:
        p = r["profile"]
        rows.append(("profiled", f"{p['runs']} runs on {p['device']} ({p['timing']}), median total "
                                 f"{p['total_ms_median']:.4f} ms, inputs {p['input_shapes']}"))
    return "<h2>Engine</h2>" + _kv(rows)


def _memory(m: dict[str, Any]) -> str:
    from kiln.cli.build import human_bytes

    top = max(m["naive_bytes"], m["arena_bytes"], 1)
    bars = []
    for i, (label, n, color) in enumerate((("arena (planned)", m["arena_bytes"], "#3b7dd8"),
                                          ("naive (one buffer per tensor)", m["naive_bytes"], "#b8c2d3"))):
        w = CHART_W * n / top
        y = i * (BAR_H + 6)
        bars.append(f"<text x='0' y='{y + 12}'>{escape(label)}</text>"
                    f"<rect x='{LABEL_W}' y='{y}' width='{w:.1f}' height='{BAR_H}' fill='{color}'/>"
                    f"<text x='{LABEL_W + w + 6:.1f}' y='{y + 12}'>{human_bytes(n)}</text>")
    svg = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{LABEL_W + CHART_W + 140}' height='{2 * (BAR_H + 6)}'>"
           + "".join(bars) + "</svg>")
    return (f"<h2>Memory plan</h2>{svg}<div class='muted'>{m['planned_tensors']} tensors share the arena; "
            f"{m['saved_percent']:g} % less than naive</div>")


def _chart(r: dict[str, Any]) -> str:
    layers = r["layers"]
    if "profile" not in r:
        return "<h2>Per-layer time</h2><p class='muted'>Not profiled: run <code>kiln inspect --profile</code>.</p>"
    times = [la.get("time_ms") or 0.0 for la in layers]
    top = max(times) or 1.0
    rows = []
    for i, (la, t) in enumerate(zip(layers, times)):
        w = CHART_W * t / top
        y = i * (BAR_H + 4)
        label = _short(f"{la['index']} {la['name']} ({la['op']})", 40)
        rows.append(f"<g><title>{escape(la['name'])}: {t:.4f} ms</title>"
                    f"<text x='0' y='{y + 12}'>{escape(label)}</text>"
                    f"<rect x='{LABEL_W}' y='{y}' width='{w:.1f}' height='{BAR_H}' fill='#e07b39'/>"
                    f"<text x='{LABEL_W + w + 6:.1f}' y='{y + 12}'>{t:.4f} ms</text></g>")
    height = len(layers) * (BAR_H + 4)
    return (f"<h2>Per-layer time</h2><svg xmlns='http://www.w3.org/2000/svg' width='{LABEL_W + CHART_W + 120}' "
            f"height='{height}'>" + "".join(rows) + "</svg>")


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _io(vals: list[dict[str, Any] | None]) -> str:
    out = []
    for v in vals:
        if v is None:
            continue
        shape = "?" if v["shape"] is None else "[" + ",".join(map(str, v["shape"])) + "]"
        out.append(f"{escape(v['name'])} <span class='muted'>{escape(str(v['dtype']))}{escape(shape)}"
                   f"{' const' if v['constant'] else ''}</span>")
    return "<br>".join(out)


def _table(r: dict[str, Any]) -> str:
    timed = "profile" in r
    head = ["#", "layer", "op", "tactic", "precision", "inputs", "outputs"] + (["time ms", "%"] if timed else [])
    rows = []
    for la in r["layers"]:
        tactics = " | ".join(dict.fromkeys(t["tactic"] for t in la["tactics"]))
        cells = [f"<td class='num'>{la['index']}</td>", f"<td>{escape(la['name'])}</td>",
                 f"<td>{escape(la['op'])}</td>",
                 f"<td>{escape(tactics)}</td>", f"<td>{escape(la['precision'])}</td>",
                 f"<td>{_io(la['inputs'])}</td>", f"<td>{_io(la['outputs'])}</td>"]
        if timed:
            t, pct = la.get("time_ms"), la.get("time_percent")
            cells += [f"<td class='num'>{'-' if t is None else f'{t:.4f}'}</td>",
                      f"<td class='num'>{'-' if pct is None else f'{pct:.1f}'}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in head)
    return f"<h2>Layers</h2><table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
