"""Automatic mixed precision: promote the most sensitive layers to int16 until PTQ is close enough.

`hat train R --stage calibration --auto-int16 --max-drop D` calibrates as usual; when the PTQ
metric is more than D points below the float one, it ranks the layers by sensitivity
(`hatcli.workflows.sensitivity`) and promotes them to int16 one at a time, most sensitive first,
re-calibrating and re-evaluating after each, until the drop is at most D or no layer is left.

One layer per step, because the drops do not add up (two layers may cost nothing alone and a lot
together, or the other way round): the first set that fits is then also the smallest prefix of
the ranking that fits, and each step costs one calibration (`calibration.num_batches` batches
plus one val pass), which is cheap next to QAT.

Every candidate is a `LoadedRecipe` built with the override `quant.int16=[...]`, so the stages
write it exactly as `hat train` would. The set chosen (the first that fits, else the one with the
smallest drop) is calibrated last, so `runs/<task>/calibration` holds its checkpoint, and the
recipe written for it (`extends` the original, plus the `--set` overrides and `[quant] int16`)
resolves to the same recipe: `hat run` on it sees calibration as up to date and goes on to QAT.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from hatcli.atomic import atomic_write_text
from hatcli.engine.trainer import PRIMARY_METRIC
from hatcli.errors import UsageError
from hatcli.quant.march import list_marches, load_march
from hatcli.recipe import apply_overrides, load_recipe
from hatcli.stages import is_up_to_date
from hatcli.workflows import stage_models, training
from hatcli.workflows.sensitivity import SensitivityReport, layer_sensitivity

MARKER = "# Written by `hat train --auto-int16`"
"""First line of every recipe this module writes (and the only kind of file it overwrites)."""


@dataclass
class Int16Step:
    """One calibration of the search."""

    step: int
    """0: the recipe as given; n: the n most sensitive layers promoted."""
    int16: list[str]
    """The whole `quant.int16` list of this step."""
    added: list[str]
    """The patterns this step added."""
    ptq: float
    drop: float


@dataclass
class AutoInt16Result:
    """What the search tried, what it chose and where it wrote the recipe."""

    recipe: str
    written: str
    metric: str
    float_metric: float
    max_drop: float
    steps: list[Int16Step]
    chosen: int
    """Index in `steps` of the set kept (and calibrated last)."""
    met: bool
    calibration_up_to_date: bool
    """Whether the written recipe sees `runs/<task>/calibration` as up to date."""
    order: list[str] = field(default_factory=list)
    """Candidate patterns, most sensitive first."""

    def to_dict(self) -> dict[str, Any]:
        """The `--json` shape."""
        data = asdict(self)
        data["int16"] = self.steps[self.chosen].int16
        return data


def check_march(march_name: str) -> None:
    """Raise a UsageError when `march_name` has no int16 activations, naming the marches that do."""
    if not load_march(march_name).quant.allow_int16:
        allowed = ", ".join(m.name for m in list_marches() if m.quant.allow_int16)
        raise UsageError(f"--auto-int16: march `{march_name}` has no int16 activations; "
                         f"marches that do: {allowed} (e.g. --set quant.march=nash_e)")


def default_output(recipe: Path) -> Path:
    """`<stem>.int16.toml` next to the recipe."""
    return recipe.with_name(f"{recipe.stem}.int16.toml")


def _check_output(recipe: Path, output: Path) -> None:
    if output.resolve() == recipe.resolve():
        raise UsageError(f"--write-recipe {output} is the recipe itself; it is never overwritten")
    if output.exists():
        first = output.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
        if not first.startswith(MARKER):
            raise UsageError(f"--write-recipe {output} exists and was not written by --auto-int16; "
                             f"choose another path")


def candidate_patterns(report: SensitivityReport, existing: list[str]) -> list[str]:
    """`quant.int16` patterns of the ranked layers that are not int16 yet, most sensitive first."""
    out: list[str] = []
    for row in report.layers:
        key = row.int16_key
        if key and row.dtype != "int16" and key not in existing and key not in out:
            out.append(key)
    return out


def recipe_text(recipe: Path, output: Path, overrides: list[str], result: AutoInt16Result) -> str:
    """The recipe kept for the chosen set: a comment with the measured drops, `extends`, overrides, int16."""
    chosen = result.steps[result.chosen]
    data: dict[str, Any] = {"extends": Path(os.path.relpath(recipe.resolve(), output.parent.resolve())).as_posix()}
    data.update(apply_overrides({}, [o for o in overrides if not o.split("=", 1)[0].strip() == "quant.int16"], {}))
    data.setdefault("quant", {})["int16"] = list(chosen.int16)
    m = result.metric
    lines = [f"{MARKER} on {recipe.name} (max drop {result.max_drop:g}).",
             f"# float {m} {result.float_metric:.2f}; PTQ {m} after each step (drop vs float):"]
    for step in result.steps:
        what = "as given" if step.step == 0 else "+ " + ", ".join(step.added)
        mark = "  <- kept" if step is chosen else ""
        lines.append(f"#   step {step.step}: {what}: {step.ptq:.2f} (drop {step.drop:.2f}){mark}")
    if not result.met:
        lines.append(f"# No set reached a drop of {result.max_drop:g} or less; the smallest drop is kept.")
    return "\n".join(lines) + "\n\n" + tomli_w.dumps(data)


def choose(steps: list[Int16Step], max_drop: float) -> int:
    """Index of the step to keep: the first whose drop fits, else the smallest drop (fewest layers on ties)."""
    for i, step in enumerate(steps):
        if step.drop <= max_drop:
            return i
    return min(range(len(steps)), key=lambda i: (steps[i].drop, i))


def _int16_override(patterns: list[str]) -> str:
    return f"quant.int16={json.dumps(patterns)}"


def auto_int16(recipe: Path, overrides: list[str] | None, max_drop: float, output: Path | None = None,
               from_path: Path | None = None, sensitivity_batches: int | None = None,
               on_step: Callable[[Int16Step], None] | None = None) -> AutoInt16Result:
    """Calibrate, then promote the most sensitive layers to int16 until PTQ drops `max_drop` or less.

    Writes the recipe for the set kept to `output` (default `<stem>.int16.toml`), atomically;
    `runs/<task>/calibration` ends holding that set's calibration. `on_step` hears of each step.
    """
    recipe, overrides = Path(recipe), list(overrides or [])
    base = load_recipe(recipe, overrides)
    check_march(base.recipe.quant.march)
    output = Path(output) if output is not None else default_output(recipe)
    _check_output(recipe, output)
    key = PRIMARY_METRIC[base.family.task]
    existing = list(base.recipe.quant.int16)
    from_path = training.float_source(base, from_path)  # weights from outside hat: imported once, as float

    def calibrate(patterns: list[str]) -> float:
        lr = base if patterns == existing else load_recipe(recipe, overrides + [_int16_override(patterns)])
        return training.calibrate(lr, from_path=from_path)["metrics"][key]

    float_metric = stage_models.evaluate_stage(base, "float")["metrics"][key]
    steps = [Int16Step(0, existing, [], ptq := calibrate(existing), float_metric - ptq)]
    if on_step:
        on_step(steps[0])
    order: list[str] = []
    if steps[0].drop > max_drop:
        order = candidate_patterns(layer_sensitivity(base, sensitivity_batches), existing)
        for n, pattern in enumerate(order, start=1):
            patterns = [*steps[-1].int16, pattern]
            ptq = calibrate(patterns)
            steps.append(Int16Step(n, patterns, [pattern], ptq, float_metric - ptq))
            if on_step:
                on_step(steps[-1])
            if steps[-1].drop <= max_drop:
                break
    chosen = choose(steps, max_drop)
    met = steps[chosen].drop <= max_drop
    if chosen != len(steps) - 1:
        calibrate(steps[chosen].int16)  # leave the kept set's calibration in runs/<task>/calibration
    result = AutoInt16Result(recipe=str(recipe), written=str(output), metric=key, float_metric=float_metric,
                             max_drop=max_drop, steps=steps, chosen=chosen, met=met,
                             calibration_up_to_date=False, order=order)
    atomic_write_text(output, recipe_text(recipe, output, overrides, result))
    result.calibration_up_to_date = is_up_to_date(load_recipe(output), "calibration")
    return result
