"""What to do about the findings of `hat debug`: each piece of advice names the layer, what to
change and the command or recipe key that changes it."""

from __future__ import annotations

from typing import Any

from hatcli.recipe import LoadedRecipe
from hatcli.workflows.debug_findings import Thresholds, alone_sqnr
from hatcli.workflows.debug_measure import INTEGER_STAGES


def _advise(layer: str, why: str, lr: LoadedRecipe, march: Any, row: dict[str, Any],
            int16_key: str | None) -> list[dict[str, str]]:
    """The advice for one layer ranked as a cause, from its diagnosis."""
    recipe, calibration = lr.path, lr.recipe.calibration
    out: list[dict[str, str]] = []
    diagnosis = row.get("diagnosis", "")

    def add(what: str, how: str) -> None:
        out.append({"layer": layer, "why": why, "do": what, "how": how})

    if "dead channel" in diagnosis or "bias saturates" in diagnosis:
        add("retrain the layer whose channels died (or prune them); check the float model first",
            f"hat eval {recipe} --stage float --compare {'qat' if lr.recipe.qat.enabled else 'calibration'}; "
            f"hat train {recipe} --stage qat")
    if "low-bit layer" in diagnosis:
        add("keep this layer at the march's int8", f'[[quant.layers]] pattern = "{layer}", scheme = "march"')
    if "scale does not cover" in diagnosis:
        if calibration.observer != "minmax":
            add("calibrate with the full observed range", 'calibration.observer = "minmax"')
        add("calibrate on more batches (the val images reach beyond the calibrated range)",
            f"calibration.num_batches = {max(2 * calibration.num_batches, 32)} (now {calibration.num_batches})")
    if "data range too large" in diagnosis and calibration.observer == "minmax":
        add("clip the outliers that set the range", 'calibration.observer = "percentile" (or "mse")')
    # int16 helps a range too wide for 8 bits, or an error with no other cause found; not a clipped
    # range, a low-bit layer or weights that changed
    wide = "data range too large" in diagnosis or not out
    if wide and row.get("dtype") in ("int8", "uint8") and int16_key and march.quant.allow_int16 \
            and "weights differ" not in diagnosis:
        add("compute this layer's output in int16",
            f'quant.int16 = ["{int16_key}"], or let `hat train {recipe} --stage calibration --auto-int16` choose')
    if not out and row.get("dtype") == "float":
        add("nothing to tune: the layer runs in float (a CPU fallback on the march)", f"hat check {recipe}")
    return out


def _evaluated(stage: str) -> str:
    """The stage `hat eval --compare` knows for a debug stage (qat_float is debug's own: the QAT model)."""
    return "qat" if stage == "qat_float" else stage


def advice(lr: LoadedRecipe, march: Any, causes: list[dict[str, Any]], divergence: dict[str, Any],
           int16_keys: dict[str, str | None], thresholds: Thresholds, pair: tuple[str, str]) -> list[dict[str, str]]:
    """Advice for the layers ranked as causes whose own error is below the SQNR threshold, and for
    the first divergence; one line saying so when nothing is wrong."""
    found: list[dict[str, str]] = []
    if divergence.get("layer") and all(stage in INTEGER_STAGES for stage in pair):
        found.append({"layer": divergence["layer"], "why": f"{pair[0]} and {pair[1]} differ here by "
                                                         f"{divergence.get('max_diff_steps')} steps",
                      "do": "recompile the artifact from the current export and compare again",
                      "how": f"hat compile {lr.path}; hat eval {lr.path} --stage deploy --compare int_infer"})
    flagged = [c for c in causes if alone_sqnr(c) < thresholds.sqnr_db]
    if divergence.get("layer") and not divergence.get("inherited") and \
            divergence["layer"] not in {c["layer"] for c in flagged}:
        flagged.append(divergence)
    if divergence.get("inherited") and not flagged and causes:
        flagged.append(causes[0])  # the divergence comes from upstream: the largest own error is the suspect
    for cause in flagged:
        why = (f"taken alone from the quantized model: {cause.get('alone_sqnr_db')} dB SQNR at its output, "
               f"{cause.get('alone_output_sqnr_db')} dB at the model's outputs")
        found += _advise(cause["layer"], why, lr, march, cause, int16_keys.get(cause["layer"]))
    if pair[0] == "float" and lr.recipe.qat.enabled and causes and "weights differ" in causes[0].get("diagnosis", ""):
        found.append({"layer": causes[0]["layer"], "why": "most of its difference from float is the weights QAT "
                                                          "trained, not their quantization",
                      "do": "trace quantization alone: the QAT model's weights in float against the integer program",
                      "how": f"hat debug {lr.path} --pair qat_float,int_infer"})
    if not found:
        found.append({"layer": "-", "why": f"no layer taken alone falls below {thresholds.sqnr_db:g} dB SQNR",
                      "do": "nothing to fix in quantization on these images; compare the pair on the whole val set",
                      "how": f"hat eval {lr.path} --stage {pair[1]} --compare {_evaluated(pair[0])}"})
        if causes:  # the layer that costs the most, and how to buy its error back if the gap matters
            top = causes[0]
            why = (f"the largest own error, though above the thresholds: {top.get('alone_sqnr_db')} dB SQNR at its "
                   f"output, {top.get('alone_output_sqnr_db')} dB at the model's outputs")
            found += [dict(item, do=f"if the remaining gap matters: {item['do']}")
                      for item in _advise(top["layer"], why, lr, march, {**top, "diagnosis": ""},
                                          int16_keys.get(top["layer"]))]
    unique: dict[tuple[str, str], dict[str, str]] = {}
    for item in found:
        unique.setdefault((item["layer"], item["do"]), item)
    return list(unique.values())
