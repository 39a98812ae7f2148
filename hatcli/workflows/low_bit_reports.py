"""A recipe's low-bit layers for the reports (`hat check`, `hat calops`), with or without a
trained checkpoint.

Which layer gets which scheme and bits depends on the graph (the first and last weighted layers,
module paths), not on the weights, so it is resolved by preparing the deploy graph of a float
model with random weights when no checkpoint is at hand (`planned_low_bit_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hatcli.plugins import quant_schemes
from hatcli.quant.low_bit.schemes import MARCH
from hatcli.quant.low_bit_records import LowBitLayer, low_bit_layers
from hatcli.recipe import LoadedRecipe
from hatcli.stages import quant_source
from hatcli.workflows.stage_models import prepare_recipe_model, quant_plan


def num_classes(lr: LoadedRecipe) -> int:
    """The model's class count: `model.num_classes`, else the packed training data's, else 1000
    (classification), 80 (detection) or 19 (segmentation), the ImageNet / COCO / Cityscapes counts."""
    wanted = lr.model.num_classes
    if wanted:
        return int(wanted)
    from hatcli.data.lmdb_format import open_packed
    from hatcli.inputs import data_path

    path = data_path(lr, "train")
    if path.exists():
        try:
            return len(open_packed(path).meta["classes"])
        except Exception:  # noqa: BLE001 - unreadable data: fall back to the standard count
            pass
    return {"detection": 80, "segmentation": 19}.get(lr.family.task, 1000)


def planned_low_bit_layers(lr: LoadedRecipe, model: torch.nn.Module | None = None) -> list[LowBitLayer]:
    """The layers the recipe's plan gives a low-bit scheme, resolved on the prepared deploy graph
    of float `model` (default: the recipe's model with random weights); [] for the march's scheme."""
    plan, _ = quant_plan(lr)
    if not plan.low_bit:
        return []
    if model is None:
        model = lr.family.build_float_model(lr.model, num_classes(lr))
    prepared, _ = prepare_recipe_model(lr, model.eval())
    return low_bit_layers(prepared)


@dataclass
class Undeployable:
    """A layer whose scheme has no integer form, and why."""

    layer: LowBitLayer
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The layer's record with `deployable: false` and the reason."""
        return {**self.layer.to_dict(), "deployable": False, "reason": self.reason}


def not_integer_schemes(lr: LoadedRecipe) -> dict[str, str]:
    """{scheme: why_not_integer} of the schemes the recipe names that cannot become integers."""
    quant = lr.recipe.quant
    names = {quant.scheme} | {rule.scheme for rule in quant.layers if rule.scheme}
    registry = quant_schemes()
    found = {}
    for name in sorted(names - {MARCH}):
        spec = registry.get(name)
        if not spec.integer:
            found[name] = spec.why_not_integer or f"scheme `{name}` has no integer form"
    return found


def undeployable_layers(lr: LoadedRecipe) -> list[Undeployable]:
    """Every layer the plan gives a scheme that cannot become an integer program (LQ-Net), with
    the scheme's reason; [] when the recipe can be converted (no checkpoint needed either way)."""
    blocked = not_integer_schemes(lr)
    if not blocked:
        return []
    return [Undeployable(layer, blocked[layer.scheme]) for layer in planned_low_bit_layers(lr)
            if layer.scheme in blocked]


def last_stage(lr: LoadedRecipe) -> str:
    """The last stage a recipe that cannot be converted reaches: qat, or calibration without QAT."""
    return quant_source(lr)
