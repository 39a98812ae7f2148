"""What each stage's output depends on, as one hash per kind of output.

`stage_fingerprint` is the hash a stage's `stage.json` (and its checkpoints) carry;
`export_fingerprint` the one in an export's manifest; `compile_fingerprint` the one in a
compiled artifact's manifest. `hat run` compares them with what the recipe gives now.
"""

from __future__ import annotations

from typing import Any

from hatcli.data.lmdb_format import open_packed
from hatcli.inputs import data_path
from hatcli.recipe import LoadedRecipe, recipe_hash
from hatcli.stages.names import quant_source


def _data_checksums(lr: LoadedRecipe) -> dict[str, Any]:
    """The packed train and val databases' checksums (None for one not packed yet)."""
    out = {}
    for split in ("train", "val"):
        path = data_path(lr, split)
        out[split] = open_packed(path).meta.get("checksums") if path.exists() else None
    return out


def stage_fingerprint(lr: LoadedRecipe, stage: str) -> str:
    """Hash of everything `stage`'s output depends on (recipe sections + upstream stage); `stage`
    is float, calibration, qat, int_infer or export (the last two: the integer program of the
    recipe's own source stage)."""
    if stage == "float":
        return recipe_hash([lr.section_hash("seed", "data", "model", "float"), _data_checksums(lr)])
    if stage == "calibration":
        return recipe_hash([stage_fingerprint(lr, "float"), lr.section_hash("calibration", "quant")])
    if stage == "qat":
        return recipe_hash([stage_fingerprint(lr, "calibration"), lr.section_hash("qat")])
    if stage in ("export", "int_infer"):  # both are the integer program of the same checkpoint
        return recipe_hash([stage_fingerprint(lr, quant_source(lr)), lr.resolved["data"]["input_size"]])
    raise ValueError(stage)


def export_fingerprint(lr: LoadedRecipe, source: str) -> str:
    """What an export of `source` depends on; for the recipe's own source stage it is the `export`
    fingerprint that `hat run` compares."""
    if source == quant_source(lr):
        return stage_fingerprint(lr, "export")
    return recipe_hash([stage_fingerprint(lr, source), lr.resolved["data"]["input_size"]])


def compile_fingerprint(export_fingerprint: str, march: str, opt: int) -> str:
    """What a compiled artifact depends on: the export's fingerprint and the march/opt chosen."""
    return recipe_hash([export_fingerprint, march, opt])
