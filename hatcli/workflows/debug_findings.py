"""What the measurements of `hat debug` mean: each layer's row, the first layer where the pair of
stages diverges, the layers ranked as causes, what is wrong with each (HAT-style diagnoses, with
their numbers), and what to do about it.

A layer's *own* error is measured by taking it alone from the quantized model (every other layer
float): the SQNR at its own output says how badly it is quantized, the SQNR of the model's
outputs what that costs them. Layers with a diagnosed quantization problem rank first, then the
second SQNR ranks the causes (the layer that loses the most is the one whose quantization alone
moves the outputs most); a cause is flagged when either is below the SQNR threshold.
Its *cumulative* error is the pair's difference at its output; the drop from its inputs'
cumulative SQNR to its own is the error added where it sits. A layer with a small own error and
a large cumulative one inherits its error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hatcli.quant.layer_graph import LayerGraph
from hatcli.workflows.debug_measure import INTEGER_STAGES, Measurements
from hatcli.workflows.debug_metrics import RangeStats, rounded

CLIPPED_LIMIT = 0.01
"""A layer whose grid cannot hold more than this share of its float values: "scale does not cover
the data range"."""
BULK_SHARE = 0.9
BULK_STEPS = 8.0
"""When `BULK_SHARE` of a layer's values lie within `BULK_STEPS` steps of zero, a few outliers set
its range and the bulk is rounded to a handful of levels: "data range too large"."""
STEP_TOLERANCE = 1.0
"""Two integer stages (int_infer, deploy) may differ by one output step (an activation fused in
float lands either side of a rounding boundary); more is a divergence."""


def over_steps(steps: float | None) -> bool:
    """Whether a difference in output steps is more than `STEP_TOLERANCE` (steps are measured on
    float values, so a difference of exactly one step reads 1.0000001)."""
    return steps is not None and steps > STEP_TOLERANCE + 1e-3


WEIGHTS_MOVED = "its weights differ from the float model's"
"""How the diagnosis of a layer whose weights (not their quantization) make its difference begins."""
CAUSES = 5
"""Layers listed as causes."""


@dataclass(frozen=True)
class Thresholds:
    """Below either (or, for two integer stages, over `STEP_TOLERANCE` steps apart) a layer diverges."""

    cosine: float = 0.99
    sqnr_db: float = 15.0

    def describe(self) -> str:
        """`cosine 0.99, SQNR 15 dB`."""
        return f"cosine {self.cosine:g}, SQNR {self.sqnr_db:g} dB"


def _value(row: dict[str, Any], key: str, default: float = math.inf) -> float:
    value = row.get(key)
    return default if value is None else float(value)


def range_diagnosis(stats: RangeStats | None, grid: Any) -> list[str]:
    """The HAT-style range findings of one layer, with their numbers (empty: nothing to say)."""
    if stats is None or grid is None or not stats.count:
        return []
    found = []
    if stats.clipped_share > CLIPPED_LIMIT:
        found.append(f"scale does not cover the data range: {100 * stats.clipped_share:.1f} % of the values lie "
                     f"outside the grid's [{grid.low:.4g}, {grid.high:.4g}] (seen on these images: "
                     f"[{stats.low:.4g}, {stats.high:.4g}])")
    steps = stats.abs_quantile(BULK_SHARE) / grid.scale if grid.scale > 0 else math.inf
    top = max(abs(grid.qmin - grid.zero_point), abs(grid.qmax - grid.zero_point))
    if steps < BULK_STEPS and stats.high > 0:
        found.append(f"data range too large: {100 * BULK_SHARE:.0f} % of the values lie within {steps:.1f} of the "
                     f"{top} steps (the range is set by outliers up to {max(abs(stats.low), stats.high):.4g})")
    return found


def layer_rows(graph: LayerGraph, measured: Measurements, thresholds: Thresholds) -> list[dict[str, Any]]:
    """One row per layer, in execution order: the pair's agreement at its output, each stage's
    SQNR against float, its own error (taken alone) and the error added where it sits."""
    pair = measured.pair
    producers = graph.producers()
    rows: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    for index, layer in enumerate(graph.layers):
        agreement = measured.layers.get(pair, {}).get(layer.name)
        row: dict[str, Any] = {"index": index, "layer": layer.name, "op": layer.op, "dtype": layer.dtype}
        row.update(agreement.to_dict() if agreement else {"cosine": None, "sqnr_db": None, "l1": None,
                                                          "max_diff_steps": None})
        for stage in measured.stages[1:]:
            other = measured.layers.get(("float", stage), {}).get(layer.name)
            row[f"{stage}_sqnr_db"] = rounded(other.sqnr_db, 2) if other else None
        alone, alone_out = measured.alone_layer.get(layer.name), measured.alone_outputs.get(layer.name)
        row["alone_sqnr_db"] = rounded(alone.sqnr_db, 2) if alone else None
        row["alone_output_sqnr_db"] = rounded(alone_out.sqnr_db, 2) if alone_out else None
        weights_out = measured.weights_outputs.get(layer.name)
        row["weights_only_output_sqnr_db"] = rounded(weights_out.sqnr_db, 2) if weights_out else None
        inputs = [by_name[p] for p in producers.get(layer.name, []) if p in by_name]
        input_sqnr = min((_value(r, "sqnr_db") for r in inputs), default=math.inf)
        row["inputs"] = ", ".join(producers.get(layer.name, [])) or "input"
        row["input_sqnr_db"] = rounded(input_sqnr, 2)
        own = _value(row, "sqnr_db")
        row["added_db"] = rounded(input_sqnr - own, 2) if math.isfinite(input_sqnr) and math.isfinite(own) else None
        # the own share holds where the layers alone were measured against the pair's first stage
        share = own_share(row) if pair[0] in ("float", "qat_float") else None
        row["own_error_pct"] = None if share is None else round(100 * share, 1)
        row["diverged"] = bool(agreement) and diverges(row, pair, thresholds)
        rows.append(row)
        by_name[layer.name] = row
    return rows


def diverges(row: dict[str, Any], pair: tuple[str, str], thresholds: Thresholds) -> bool:
    """Whether a layer row of the pair falls below the thresholds (two integer stages: differs by
    more than `STEP_TOLERANCE` steps)."""
    if all(stage in INTEGER_STAGES for stage in pair):
        return over_steps(row.get("max_diff_steps"))
    return _value(row, "cosine", 1.0) < thresholds.cosine or _value(row, "sqnr_db") < thresholds.sqnr_db


def weights_diagnosis(row: dict[str, Any], weight: dict[str, Any]) -> list[str]:
    """Whether a layer's difference from float is mostly its weights (moved by QAT, or edited)
    rather than their quantization: taken alone with its weights but no quantization, the outputs
    already carry at least half of the error they carry with both."""
    weights_only, alone = _value(row, "weights_only_output_sqnr_db"), _value(row, "alone_output_sqnr_db")
    if not math.isfinite(weights_only) or weights_only > alone + 3.0:
        return []
    moved = weight.get("changed_from_float_pct")
    return [f"{WEIGHTS_MOVED} ({moved} % of their norm): with them alone, unquantized, "
            f"the outputs are at {weights_only} dB SQNR, so most of this layer's difference is the weights"]


def layer_diagnoses(graph: LayerGraph, rows: list[dict[str, Any]], measured: Measurements,
                    weights: list[dict[str, Any]], quantization: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Layer -> what is wrong with it, in words with numbers (range, weights, bias, scheme)."""
    by_weights = {row["layer"]: row for row in weights}
    by_quant = {row["layer"]: row for row in quantization}
    by_row = {row["layer"]: row for row in rows}
    found: dict[str, list[str]] = {}
    for layer in graph.layers:
        items = range_diagnosis(measured.ranges.get(layer.name), graph.output_grid(layer))
        weight = by_weights.get(layer.name, {})
        if weight.get("dead_channels"):
            items.append(f"{weight['dead_channels']} dead channel(s) of {weight['channels']} (all-zero weights, "
                         f"scale at its floor): {weight['dead']}")
        if weight.get("saturated_bias_channels"):
            items.append(f"int32 bias saturates on {weight['saturated_bias_channels']} channel(s)")
        scheme = by_quant.get(layer.name, {}).get("scheme", "march")
        if scheme != "march":
            items.append(f"low-bit layer: {scheme}")
        if layer.dtype == "float":
            items.append("left float (no quantizer for this op)")
        found[layer.name] = items + weights_diagnosis(by_row.get(layer.name, {}), weight)
    return found


def first_divergence(rows: list[dict[str, Any]], pair: tuple[str, str], thresholds: Thresholds,
                     diagnoses: dict[str, list[str]], quantization: list[dict[str, Any]]) -> dict[str, Any]:
    """The first layer in execution order where the pair diverges, with what set its quantization."""
    row = next((r for r in rows if r["diverged"]), None)
    if row is None:
        rule = ("more than one output step apart" if all(s in INTEGER_STAGES for s in pair)
                else f"below {thresholds.describe()}")
        return {"layer": None, "pair": f"{pair[0]} vs {pair[1]}",
                "note": f"no layer of {pair[0]} vs {pair[1]} is {rule}"}
    rule = next((q for q in quantization if q["layer"] == row["layer"]), {})
    keys = ("layer", "index", "op", "dtype", "cosine", "sqnr_db", "max_diff_steps", "input_sqnr_db", "added_db",
            "alone_sqnr_db", "alone_output_sqnr_db")
    found = {key: row.get(key) for key in keys}
    share = row.get("own_error_pct")
    inherited = None if share is None else share < 50
    found.update(pair=f"{pair[0]} vs {pair[1]}", own_error_pct=share, inherited=inherited,
                 reading="-" if inherited is None else
                 f"inherited: {share} % of the error here is the layer's own; the rest comes from its inputs "
                 f"({row.get('inputs')}, at {row.get('input_sqnr_db')} dB): see the causes" if inherited else
                 f"its own: {share} % of the error here is made by the layer itself",
                 diagnosis="; ".join(diagnoses.get(row["layer"], [])) or "-",
                 rule=rule.get("rule", "-"), where=rule.get("where", "-"))
    return found


def own_share(row: dict[str, Any]) -> float | None:
    """The share (0..1) of a layer's cumulative error (vs float) that is its own: error energies
    add, so it is the ratio of the noise taken alone to the cumulative noise."""
    alone, cumulative = _value(row, "alone_sqnr_db"), _value(row, "sqnr_db")
    if not (math.isfinite(alone) and math.isfinite(cumulative)):
        return None
    return min(1.0, 10 ** ((cumulative - alone) / 10))


def alone_sqnr(row: dict[str, Any]) -> float:
    """A layer's own error, as the lower of its two SQNRs taken alone: at its own output (how
    badly it is quantized) and at the model's outputs (what that costs them)."""
    return min(_value(row, "alone_sqnr_db"), _value(row, "alone_output_sqnr_db"))


def rank_causes(rows: list[dict[str, Any]], diagnoses: dict[str, list[str]], quantization: list[dict[str, Any]],
                count: int = CAUSES) -> list[dict[str, Any]]:
    """The layers ranked as causes, first: those with a quantization problem diagnosed (a range, a
    dead channel, a low-bit scheme, a float layer; not weights that QAT moved), then by how much
    their own error costs the model's outputs (taken alone, the outputs' SQNR lowest; then the
    SQNR at the layer's own output)."""
    rules = {q["layer"]: q for q in quantization}

    def undiagnosed(row: dict[str, Any]) -> bool:
        return not any(not item.startswith(WEIGHTS_MOVED) for item in diagnoses.get(row["layer"], []))

    ranked = sorted(rows, key=lambda r: (undiagnosed(r), _value(r, "alone_output_sqnr_db"), alone_sqnr(r),
                                         -_value(r, "added_db", 0.0)))
    causes = []
    for rank, row in enumerate(ranked[:count], start=1):
        causes.append({"rank": rank, "layer": row["layer"], "op": row["op"], "dtype": row["dtype"],
                       "alone_output_sqnr_db": row["alone_output_sqnr_db"], "alone_sqnr_db": row["alone_sqnr_db"],
                       "added_db": row["added_db"], "diagnosis": "; ".join(diagnoses.get(row["layer"], [])) or "-",
                       "rule": rules.get(row["layer"], {}).get("rule", "-"),
                       "where": rules.get(row["layer"], {}).get("where", "-")})
    return causes
