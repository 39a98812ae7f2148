"""`perf.html`: the compiled artifact's performance report as one self-contained HTML page.

The page holds what HAT's perf report shows, from the artifact's `perf.json`: latency, FPS,
MACs and OPs per frame, DDR bytes per frame and per second (estimated on a BPU march, with the
word "estimated" wherever a figure is), the host measurement when there is one, a bar chart of
the slowest layers (inline SVG) and the per-layer table with each layer's share of the time and
what bounds it. No scripts, no external files: it opens from a copied artifact folder offline.
"""

from __future__ import annotations

from html import escape
from typing import Any

from hatcli.deploy.perf import error_detail, error_phrase

SLOWEST = 15
"""How many layers the bar chart shows."""

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #1d2330; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.sub { color: #5b6475; margin-top: 0; } .est { color: #a05a00; font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; }
.card { border: 1px solid #d8dde6; border-radius: 6px; padding: .6rem .9rem; min-width: 10rem; }
.card b { display: block; font-size: 1.3rem; }
table { border-collapse: collapse; width: 100%; } th, td { padding: .25rem .5rem; text-align: right; }
th { background: #eef1f6; position: sticky; top: 0; } td.l, th.l { text-align: left; }
tr:nth-child(even) td { background: #f7f8fb; } tr.fb td { background: #fff1e0; }
ul.notes { color: #5b6475; }
"""


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:,.{digits}f}"


def _error_paragraph(estimate: dict[str, Any]) -> str:
    """How far off this kind of estimate has been (a fitted model), or that it is unvalidated."""
    error = estimate.get("error")
    if not error:
        return ("<p class='est'>roofline cost model (docs/perf_model.md), not fitted to measured whole-model "
                "latencies of this march</p>")
    detail = error_detail(error)
    text = escape(f"estimated: {error_phrase(error)}" + (f" ({detail})" if detail else ""))
    if estimate.get("extrapolated"):
        text += " &mdash; <b>extrapolated</b>: " + escape("; ".join(estimate.get("extrapolation", [])))
    return f"<p class='est'>{text}</p>"


def _card(label: str, value: str, estimated: bool) -> str:
    tag = ' <span class="est">estimated</span>' if estimated else ""
    return f'<div class="card">{escape(label)}{tag}<b>{escape(value)}</b></div>'


def slowest_layers_chart(layers: list[dict[str, Any]]) -> str:
    """Inline SVG: horizontal bars of the slowest layers' time, labelled with name and share."""
    slowest = sorted((l for l in layers if l.get("time_us", 0) > 0), key=lambda l: -l["time_us"])[:SLOWEST]
    if not slowest:
        return "<p>No layer has a cost.</p>"
    top = slowest[0]["time_us"]
    row, label_w, bar_w = 22, 360, 520
    parts = [f'<svg width="{label_w + bar_w + 140}" '
             f'height="{row * len(slowest) + 8}" role="img" aria-label="slowest layers">']
    for i, layer in enumerate(slowest):
        y = 4 + i * row
        width = max(1.0, bar_w * layer["time_us"] / top)
        colour = "#d9822b" if layer.get("fallback") else "#3d7bd9"
        module = layer.get("module")
        name = f"{module} ({layer['name']}, {layer['op_type']})" if module else f"{layer['name']} ({layer['op_type']})"
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" font-size="12">'
                     f'{escape(name[:58])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 2}" width="{width:.1f}" height="{row - 6}" fill="{colour}"/>')
        parts.append(f'<text x="{label_w + width + 6:.1f}" y="{y + 15}" font-size="12">'
                     f'{layer["time_us"]:.1f} us, {layer.get("percent", 0):.1f}%</text>')
    parts.append("</svg>")
    return "".join(parts)


def layer_table(layers: list[dict[str, Any]]) -> str:
    """HTML table of every layer of an estimate: node, module, op, MACs, bytes, times, share, bound."""
    head = ("<tr><th>#</th><th class='l'>layer</th><th class='l'>module</th><th class='l'>op</th>"
            "<th class='l'>fused</th>"
            "<th>MACs</th><th>DDR bytes</th><th>compute us</th><th>memory us</th><th>time us</th>"
            "<th>% of time</th><th class='l'>bound</th><th class='l'>runs on</th></tr>")
    rows = []
    for i, l in enumerate(layers):
        where = "CPU fallback" if l.get("fallback") else ("-" if l.get("bound") == "none" else "accelerator")
        rows.append(
            f"<tr class='{'fb' if l.get('fallback') else ''}'><td>{i}</td><td class='l'>{escape(l['name'])}</td>"
            f"<td class='l'>{escape(l.get('module') or '-')}</td><td class='l'>{escape(l['op_type'])}</td>"
            f"<td class='l'>{escape('+'.join(l.get('fused') or []))}</td>"
            f"<td>{l['macs']:,}</td><td>{l['ddr_bytes']:,}</td><td>{l['compute_us']:.2f}</td>"
            f"<td>{l['memory_us']:.2f}</td><td>{l['time_us']:.2f}</td><td>{l.get('percent', 0):.2f}</td>"
            f"<td class='l'>{escape(l['bound'])}</td><td class='l'>{where}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def render_perf_html(perf: dict[str, Any], title: str = "hat perf report") -> str:
    """Return the report page for one `perf.json` dict (as `hat compile` writes it)."""
    estimate = perf.get("estimate")
    measured = perf.get("measured")
    estimated = bool(perf.get("estimated", True))
    chip = perf.get("chip") or perf.get("march", "")
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
           f"<style>{_STYLE}</style></head><body>",
           f"<h1>{escape(title)}</h1>",
           f"<p class='sub'>march <b>{escape(str(perf.get('march')))}</b> ({escape(str(chip))})"
           + (f", opt {escape(str(perf['opt']))}" if "opt" in perf else "")
           + (" &mdash; <span class='est'>every accelerator figure is an estimate of hat's cost model"
              " (docs/perf_model.md)</span>" if estimated else "") + "</p>"]
    if estimate:
        cards = [
            _card("latency", f"{_fmt(estimate['latency_ms'])} ms", estimated),
            _card("FPS", _fmt(estimate["fps"], 1), estimated),
            _card("MACs / frame", f"{estimate['total_macs'] / estimate['batch'] / 1e9:.3f} G", False),
            _card("OPs / frame", f"{estimate['ops_per_frame'] / 1e9:.3f} G", False),
            _card("DDR / frame", f"{estimate['ddr_bytes_per_frame'] / 1e6:.3f} MB", estimated),
            _card("DDR bandwidth", f"{_fmt(estimate['ddr_mbytes_per_s'], 1)} MB/s", estimated),
            _card("batch", str(estimate["batch"]), False),
        ]
        out.append(f"<h2>Estimate on {escape(str(perf.get('march')))}</h2><div class='cards'>{''.join(cards)}</div>")
        if estimated:
            out.append(_error_paragraph(estimate))
        if estimate.get("cost_model") == "fitted":
            out.append(f"<p>compute {_fmt(estimate['compute_ms'])} ms, memory {_fmt(estimate['memory_ms'])} ms, "
                       f"fixed and per-block costs {_fmt(estimate['overhead_ms'])} ms (a fitted sum of each "
                       "block's work, docs/perf_model.md section 6)</p>")
        else:
            out.append(f"<p>compute {_fmt(estimate['compute_ms'])} ms, memory {_fmt(estimate['memory_ms'])} ms, "
                       f"fixed per-layer cost {_fmt(estimate['overhead_ms'])} ms (each layer counts the slower of "
                       "its compute and its memory time)</p>")
    elif perf.get("estimate_error"):
        out.append(f"<p>No estimate: {escape(perf['estimate_error'])}</p>")
    if measured:
        cards = [_card("median latency", f"{_fmt(measured['median_ms'])} ms", False),
                 _card("p90 latency", f"{_fmt(measured['p90_ms'])} ms", False),
                 _card("FPS", _fmt(measured["fps"], 1), False),
                 _card("runs", f"{measured['runs']} after {measured['warmup']} warm-up", False)]
        out.append("<h2>Measured on this host (ONNX Runtime)</h2>"
                   f"<div class='cards'>{''.join(cards)}</div>")
    if estimate:
        out.append(f"<h2>Slowest layers</h2>{slowest_layers_chart(estimate['layers'])}")
        out.append(f"<h2>Layers ({len(estimate['layers'])})</h2>{layer_table(estimate['layers'])}")
        if estimate.get("notes"):
            out.append("<ul class='notes'>" + "".join(f"<li>{escape(n)}</li>" for n in estimate["notes"]) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)
