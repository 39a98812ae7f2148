"""Inline SVG charts for the run report: training curves in panels, and an estimate with its band.

Plain SVG text, no scripts and nothing fetched: the report opens offline. Every label is
escaped here, so the caller can insert the result as markup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

COLOURS = ("#3d7bd9", "#d9822b", "#2a9d5b", "#b5409c", "#6b6f7a", "#c23b3b")
_W, _H = 300, 190
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 12, 34, 30


@dataclass
class Panel:
    """One plot of a chart: named series of (x, y) points sharing the panel's axes."""

    title: str
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """About `count` round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:  # one value: centre it
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(ticks[-1] + step)
    return ticks


def _tick_text(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def _panel_svg(panel: Panel, x0: int) -> list[str]:
    """The SVG elements of one panel drawn with its left edge at `x0`."""
    points = [p for series in panel.series.values() for p in series]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = nice_ticks(min(xs), max(xs)) if len(set(xs)) > 1 else [xs[0] - 1, xs[0], xs[0] + 1]
    y_ticks = nice_ticks(min(ys), max(ys))
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return x0 + _LEFT + plot_w * (x - x_lo) / ((x_hi - x_lo) or 1)

    def sy(y: float) -> float:
        return _TOP + plot_h * (1 - (y - y_lo) / ((y_hi - y_lo) or 1))

    out = [f'<text x="{x0 + _LEFT}" y="14" font-size="13" font-weight="600">{escape(panel.title)}</text>',
           f'<rect x="{x0 + _LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#c9cfda"/>']
    for tick in y_ticks:
        y = sy(tick)
        out.append(f'<line x1="{x0 + _LEFT}" x2="{x0 + _LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eef1f6"/>')
        out.append(f'<text x="{x0 + _LEFT - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                   f'{_tick_text(tick)}</text>')
    for tick in x_ticks:
        out.append(f'<text x="{sx(tick):.1f}" y="{_TOP + plot_h + 14}" font-size="10" text-anchor="middle">'
                   f'{_tick_text(tick)}</text>')
    out.append(f'<text x="{x0 + _LEFT + plot_w / 2:.0f}" y="{_H - 2}" font-size="10" text-anchor="middle" '
               f'fill="#5b6475">epoch</text>')
    legend_x = x0 + _LEFT
    for i, (name, series) in enumerate(panel.series.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in series)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.8">'
                   f'<title>{escape(name)}</title></polyline>')
        out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{colour}"/>' for x, y in series)
        out.append(f'<rect x="{legend_x}" y="20" width="10" height="4" fill="{colour}"/>'
                   f'<text x="{legend_x + 13}" y="25" font-size="10">{escape(name)}</text>')
        legend_x += 18 + 6 * len(name)
    return out


def curves_chart(panels: list[Panel], label: str) -> str:
    """One SVG with `panels` side by side (empty panels left out); "" when none has a point.
    `label` names the chart for screen readers and tests (`data-chart`)."""
    panels = [p for p in panels if any(p.series.values())]
    if not panels:
        return ""
    width = _W * len(panels)
    parts = [f'<svg class="chart" data-chart="{escape(label)}" '
             f'width="{width}" height="{_H}" viewBox="0 0 {width} {_H}" role="img" aria-label="{escape(label)}">']
    for i, panel in enumerate(panels):
        parts.extend(_panel_svg(panel, i * _W))
    parts.append("</svg>")
    return "".join(parts)


def band_chart(estimate_ms: float, low_ms: float | None, high_ms: float | None,
               measured_ms: float | None = None, label: str = "estimate") -> str:
    """A horizontal scale with the estimate as a dot, its error band as a bar (when given) and a
    host measurement as a tick (when given)."""
    values = [v for v in (estimate_ms, low_ms, high_ms, measured_ms) if v is not None]
    ticks = nice_ticks(0.0, max(values) * 1.05)
    width, height, left, right = 520, 58, 20, 20
    span = ticks[-1] or 1.0

    def sx(value: float) -> float:
        return left + (width - left - right) * value / span

    parts = [f'<svg class="band" data-chart="{escape(label)}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">',
             f'<line x1="{left}" x2="{width - right}" y1="30" y2="30" stroke="#c9cfda"/>']
    for tick in ticks:
        parts.append(f'<text x="{sx(tick):.1f}" y="52" font-size="10" text-anchor="middle">{_tick_text(tick)} ms</text>')
    if low_ms is not None and high_ms is not None:
        parts.append(f'<rect x="{sx(low_ms):.1f}" y="22" width="{max(1.0, sx(high_ms) - sx(low_ms)):.1f}" '
                     f'height="16" fill="#3d7bd9" fill-opacity="0.25"><title>error band</title></rect>')
    parts.append(f'<circle cx="{sx(estimate_ms):.1f}" cy="30" r="5" fill="#3d7bd9"><title>estimate</title></circle>')
    if measured_ms is not None:
        parts.append(f'<line x1="{sx(measured_ms):.1f}" x2="{sx(measured_ms):.1f}" y1="16" y2="44" stroke="#d9822b" '
                     f'stroke-width="2"><title>measured on this host</title></line>')
    parts.append("</svg>")
    return "".join(parts)


LAYER_SERIES = (("sqnr_db", "the pair, in the chain"), ("alone_output_sqnr_db", "the layer alone: at the outputs"),
                ("alone_sqnr_db", "the layer alone: at its output"))
"""The per-layer SQNRs of `hat debug` drawn by `layer_chart`: row key and legend."""


def layer_chart(rows: list[dict], threshold_db: float | None, marks: dict[str, str], label: str) -> str:
    """`hat debug`'s layers in execution order against SQNR (dB, higher is closer): the pair's
    cumulative SQNR and each layer's own, the threshold as a dashed line, and the layers in
    `marks` (name -> label) as vertical lines. A layer whose value is identical (no SQNR) is
    left out of that series. "" when no row has a value."""
    series = {legend: [(float(i), float(row[key])) for i, row in enumerate(rows)
                       if isinstance(row.get(key), (int, float))] for key, legend in LAYER_SERIES}
    series = {legend: points for legend, points in series.items() if points}
    if not series:
        return ""
    width, height, left, right, top, bottom = 940, 260, 52, 16, 40, 34
    values = [y for points in series.values() for _, y in points] + ([threshold_db] if threshold_db else [])
    y_ticks = nice_ticks(min(values), max(values))
    plot_w, plot_h = width - left - right, height - top - bottom
    last = max(len(rows) - 1, 1)

    def sx(index: float) -> float:
        return left + plot_w * index / last

    def sy(value: float) -> float:
        return top + plot_h * (1 - (value - y_ticks[0]) / ((y_ticks[-1] - y_ticks[0]) or 1))

    out = [f'<svg class="chart" data-chart="{escape(label)}" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#c9cfda"/>']
    for tick in y_ticks:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" stroke="#eef1f6"/>'
                   f'<text x="{left - 4}" y="{sy(tick) + 4:.1f}" font-size="10" text-anchor="end">'
                   f'{_tick_text(tick)}</text>')
    out.append(f'<text x="14" y="{top + plot_h / 2:.0f}" font-size="10" fill="#5b6475" '
               f'transform="rotate(-90 14 {top + plot_h / 2:.0f})" text-anchor="middle">SQNR dB</text>'
               f'<text x="{left + plot_w / 2:.0f}" y="{height - 4}" font-size="10" text-anchor="middle" '
               f'fill="#5b6475">layer, in execution order (0 .. {len(rows) - 1})</text>')
    for tick in nice_ticks(0, len(rows) - 1, 8) if len(rows) > 1 else [0]:
        if 0 <= tick <= len(rows) - 1:
            out.append(f'<text x="{sx(tick):.1f}" y="{top + plot_h + 14}" font-size="10" text-anchor="middle">'
                       f'{_tick_text(tick)}</text>')
    if threshold_db is not None:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(threshold_db):.1f}" y2="{sy(threshold_db):.1f}" '
                   f'stroke="#c23b3b" stroke-dasharray="5 4"><title>threshold {threshold_db:g} dB</title></line>')
    names = [str(row.get("layer", i)) for i, row in enumerate(rows)]
    for name, text in marks.items():
        if name in names:
            x = sx(names.index(name))
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#b5409c" '
                       f'stroke-width="1.5"/><text x="{min(x + 4, width - 200):.1f}" y="{top + 12}" font-size="11" '
                       f'fill="#b5409c">{escape(text)}: {escape(name)}</text>')
    legend_x = left
    for i, (legend, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{colour}">'
                   f'<title>{escape(names[int(x)])}: {escape(legend)} {y:g} dB</title></circle>' for x, y in points)
        out.append(f'<rect x="{legend_x}" y="18" width="10" height="4" fill="{colour}"/>'
                   f'<text x="{legend_x + 13}" y="23" font-size="10">{escape(legend)}</text>')
        legend_x += 24 + 6 * len(legend)
    out.append("</svg>")
    return "".join(out)
