"""The quantization each layer got, and the recipe rule that gave it: `quant.int16` patterns, the
family's int16 wishes, `[[quant.layers]]` rules, `quant.scheme` and the march's defaults, each
with the `file:line` of the recipe (or the base recipe it extends) where the rule is written.
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatcli.quant.layer_graph import LayerGraph
from hatcli.quant.low_bit_records import low_bit_layers
from hatcli.quant.sensitivity import QuantLayer
from hatcli.recipe import LoadedRecipe, find_key_line
from hatcli.workflows.debug_metrics import rounded
from hatcli.workflows.stage_models import int16_patterns

SCALE_FLOOR = 1.2e-7 * 1.01
"""A per-channel weight scale at or below this is the observer's floor (float32 eps): an all-zero channel."""


@dataclass(frozen=True)
class Rule:
    """Why a layer is quantized as it is: the rule, and where the recipe sets it."""

    text: str
    where: str


def _chain(path: Path) -> list[Path]:
    """The recipe file and the files it extends, nearest first."""
    files, seen = [], set()
    while path.is_file() and path.resolve() not in seen:
        seen.add(path.resolve())
        files.append(path)
        try:
            parent = tomllib.loads(path.read_text(encoding="utf-8")).get("extends")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            break
        if not isinstance(parent, str):
            break
        path = path.parent / parent
    return files


def recipe_location(lr: LoadedRecipe, dotted: str, value_text: str | None = None) -> str:
    """`file:line` where the recipe chain writes `dotted` (or, with `value_text`, the line holding
    that text inside the key's table, e.g. one `[[quant.layers]]` pattern); `default` when no file
    writes it (a schema default, or a `--set` override)."""
    for path in _chain(Path(lr.path)):
        text = path.read_text(encoding="utf-8", errors="replace")
        if value_text is not None:
            quoted = re.escape(value_text)
            for number, line in enumerate(text.split("\n"), start=1):
                if re.search(rf"""["']{quoted}["']""", line):
                    return f"{path}:{number}"
        elif line := find_key_line(text, dotted):
            return f"{path}:{line}"
    return "default"


def _first_match(path: str, patterns: list[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatch(path, p)), None)


def quantization_rule(lr: LoadedRecipe, march: Any, layer: QuantLayer, path: str, low_bit: dict[str, Any]) -> Rule:
    """The rule behind `layer`'s quantization (`path`: the module path of its op)."""
    quant = lr.recipe.quant
    if layer.dtype == "int16":
        keys = [k for k in (layer.int16_key, path) if k]
        for pattern in quant.int16:
            if any(fnmatch.fnmatch(k, pattern) for k in keys):
                return Rule(f'quant.int16 pattern "{pattern}"', recipe_location(lr, "quant.int16", pattern))
        wished = [p for p in int16_patterns(lr, march) if p not in quant.int16]
        pattern = next((p for p in wished if any(fnmatch.fnmatch(k, p) for k in keys)), None)
        if pattern:
            return Rule(f'family {lr.family.name} asks int16 for "{pattern}" (int16_outputs)', "family")
    if path in low_bit:
        for rule in quant.layers:
            if fnmatch.fnmatch(path, rule.pattern):
                return Rule(f'[[quant.layers]] pattern "{rule.pattern}": {low_bit[path].describe()}',
                            recipe_location(lr, "quant.layers", rule.pattern))
        return Rule(f'quant.scheme = "{quant.scheme}": {low_bit[path].describe()}', recipe_location(lr, "quant.scheme"))
    if quant.scheme != "march" and layer.op.startswith(("conv", "linear")):
        for rule in quant.layers:
            if fnmatch.fnmatch(path, rule.pattern):
                return Rule(f'[[quant.layers]] pattern "{rule.pattern}" keeps the march\'s int8',
                            recipe_location(lr, "quant.layers", rule.pattern))
        if quant.keep_first_last:
            return Rule("quant.keep_first_last = true: first / last layer at the march's int8",
                        recipe_location(lr, "quant.keep_first_last"))
    if layer.dtype == "float":
        return Rule("left float: the quantizer does not know the op (a CPU fallback, see `hat check`)", "model")
    what = {"int32": "int32 accumulator (a graph output)", "uint8": "uint8 (non-negative output)"}.get(
        layer.dtype, layer.dtype)
    return Rule(f'march "{march.name}" default: {what}', recipe_location(lr, "quant.march"))


def applied_quantization(lr: LoadedRecipe, march: Any, graph: LayerGraph) -> list[dict[str, Any]]:
    """Every layer's quantization as the quantized graph applies it, with the rule behind it."""
    low_bit = {record.module: record for record in low_bit_layers(graph.prepared)}
    calibration = lr.recipe.calibration
    observer = calibration.observer + (f" {calibration.percentile:g}" if calibration.observer == "percentile" else "")
    if lr.recipe.qat.enabled and lr.recipe.qat.activation_scales == "learned":
        observer += ", scale learned in QAT (LSQ)"
    rows = []
    for layer in graph.layers:
        path = graph.anchor_path(layer)
        grid = graph.output_grid(layer)
        weights = graph.weight_channels(layer)
        record = low_bit.get(path)
        rule = quantization_rule(lr, march, layer, path, low_bit)
        row: dict[str, Any] = {"layer": layer.name, "op": layer.op, "output": layer.dtype,
                               "scheme": record.describe() if record else "march",
                               "weight": (f"{record.weight_bits}-bit" if record else "int8 per channel")
                               if weights is not None else "-",
                               "output_scale": rounded(grid.scale, 8) if grid else None,
                               "zero_point": grid.zero_point if grid else None,
                               "grid": f"[{grid.qmin}, {grid.qmax}]" if grid else "-"}
        if weights is not None:
            live = weights[1][weights[1] > SCALE_FLOOR]
            row["weight_scale_min"] = rounded(float(live.min()), 8) if live.numel() else None
            row["weight_scale_max"] = rounded(float(live.max()), 8) if live.numel() else None
        row.update(observer=observer if grid else "-", rule=rule.text, where=rule.where)
        rows.append(row)
    return rows


def weight_findings(graph: LayerGraph, float_graph: LayerGraph, saturation: list[Any]) -> list[dict[str, Any]]:
    """Per conv / linear layer: dead channels (all-zero weights, scale at its floor), the spread
    of its per-channel scales, how far its weights moved from the float model's (QAT), and a
    saturated bias."""
    saturated = {record.layer: record for record in saturation}
    rows = []
    for layer in graph.layers:
        weights = graph.weight_channels(layer)
        if weights is None:
            continue
        values, scales = weights
        dead = [int(c) for c in ((values.abs().amax(1) == 0) | (scales <= SCALE_FLOOR)).nonzero().reshape(-1)]
        live = scales[scales > SCALE_FLOOR]
        reference = float_graph.weight(layer)
        change = None
        if reference is not None and reference.numel() == values.numel():
            reference = reference.reshape(values.shape).double()
            norm = float(reference.norm())
            change = float((values.double() - reference).norm()) / norm * 100 if norm else None
        bias = saturated.get(graph.anchor_path(layer)) or saturated.get(layer.name)
        rows.append({"layer": layer.name, "channels": int(values.shape[0]), "dead_channels": len(dead),
                     "dead": ",".join(map(str, dead[:16])) + (",..." if len(dead) > 16 else ""),
                     "scale_spread": rounded(float(live.max() / live.min()), 2) if live.numel() else None,
                     "changed_from_float_pct": None if change is None or not math.isfinite(change) else round(change, 3),
                     "saturated_bias_channels": bias.channels if bias else 0})
    return rows
