"""The stages by name, and which one each is built on."""

from __future__ import annotations

from hatcli.recipe import LoadedRecipe

TRAIN_STAGES = ("float", "calibration", "qat")
EVAL_STAGES = ("float", "calibration", "qat", "int_infer", "deploy")
UPSTREAM = {"float": None, "calibration": "float", "qat": "calibration"}
"""The stage each training stage starts from."""

EXPORTABLE_STAGES = ("calibration", "qat")
"""Stages whose model can be exported: calibration (post-training quantization) or QAT."""


def quant_source(lr: LoadedRecipe) -> str:
    """The stage whose checkpoint becomes the integer model: qat, or calibration when QAT is off."""
    return "qat" if lr.recipe.qat.enabled else "calibration"
