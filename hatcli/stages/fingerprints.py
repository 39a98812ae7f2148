"""What each stage's output depends on, as one hash per kind of output.

`stage_fingerprint` is the hash a stage's `stage.json` (and its checkpoints) carry;
`export_fingerprint` the one in an export's manifest; `compile_fingerprint` the one in a
compiled artifact's manifest. `hat run` compares them with what the recipe gives now.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hatcli.data.lmdb_format import open_packed
from hatcli.inputs import data_path
from hatcli.recipe import LoadedRecipe, recipe_hash
from hatcli.stages.folders import stage_dir
from hatcli.stages.names import quant_source


def _data_checksums(lr: LoadedRecipe) -> dict[str, Any]:
    """The packed train and val databases' checksums (None for one not packed yet)."""
    out = {}
    for split in ("train", "val"):
        path = data_path(lr, split)
        out[split] = open_packed(path).meta.get("checksums") if path.exists() else None
    return out


_DIGESTS: dict[tuple[str, int, int], str] = {}
"""sha256 of the files already hashed in this process, by (path, size, mtime)."""


def file_sha256(path: Path) -> str:
    """The sha256 of the file at `path` (hashed once per process while its size and mtime stay)."""
    path = Path(path)
    info = path.stat()
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _float_sections(lr: LoadedRecipe) -> dict[str, Any]:
    """The recipe sections the float stage depends on; `model.weights` counts by the file's content
    (a file not there counts as such: the stage cannot be up to date with it)."""
    sections = {key: lr.resolved.get(key) for key in ("seed", "data", "model", "float")}
    weights = (sections["model"] or {}).get("weights")
    if weights is not None:
        content = f"sha256:{file_sha256(Path(weights))}" if Path(weights).is_file() else f"missing:{weights}"
        sections["model"] = {**sections["model"], "weights": content}
    return sections


def imported_float(lr: LoadedRecipe) -> dict[str, Any] | None:
    """Where the float stage's weights came from when `hat train R --stage calibration --from FILE`
    imported them (its `stage.json`'s `weights_from`: path, sha256, format, the load report), else None.

    Such a stage is remade by importing the same file again, never by training from scratch, until
    `hat train R --stage float` trains one; a recipe with `[model] weights` makes its float stage
    from that key instead (None here).
    """
    if getattr(lr.model, "weights", None):
        return None
    path = stage_dir(lr, "float") / "stage.json"
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return None
    source = record.get("weights_from") if isinstance(record, dict) else None
    return source if isinstance(source, dict) and source.get("via") == "--from" else None


def float_fingerprint(lr: LoadedRecipe, imported_sha256: str | None = None) -> str:
    """The float stage's fingerprint: of the recipe's seed, data, model and float sections when it is
    trained (or made from `[model] weights`); of the imported file's content and what an import
    depends on (seed: the head it may replace; data; model) when `--from` imported it."""
    if imported_sha256 is None:
        return recipe_hash([recipe_hash(_float_sections(lr)), _data_checksums(lr)])
    return recipe_hash(["imported", imported_sha256, lr.section_hash("seed", "data", "model"), _data_checksums(lr)])


def stage_fingerprint(lr: LoadedRecipe, stage: str) -> str:
    """Hash of everything `stage`'s output depends on (recipe sections + upstream stage, down to the
    file a float stage was imported from: `float_fingerprint`); `stage` is float, calibration, qat, int_infer or export (the last two: the integer program of the
    recipe's own source stage)."""
    if stage == "float":
        source = imported_float(lr)
        return float_fingerprint(lr, source.get("sha256") if source else None)
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
