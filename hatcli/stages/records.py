"""`stage.json`, the record each stage leaves, and the checks read from records and manifests:
is a stage (an export, a compiled artifact) up to date, can an unfinished stage be resumed.

A record holds the stage's fingerprint, metrics, time, artifacts and whether it finished
(epochs done of planned); it is written atomically beside the resolved `recipe.toml`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hatcli.atomic import atomic_write_json, atomic_write_text
from hatcli.recipe import LoadedRecipe
from hatcli.stages.fingerprints import compile_fingerprint, file_sha256, stage_fingerprint
from hatcli.stages.folders import stage_dir


def read_stage_record(lr: LoadedRecipe, stage: str) -> dict[str, Any] | None:
    """The `stage.json` a finished stage wrote, or None."""
    path = stage_dir(lr, stage) / "stage.json"
    return json.loads(path.read_text()) if path.exists() else None


def stage_record(lr: LoadedRecipe, stage: str, metrics: dict, seconds: float, artifacts: list[str],
                 extra: dict | None = None) -> dict[str, Any]:
    """The record of a finished `stage` (`extra` keys added, or overriding, at the end)."""
    return {"stage": stage, "fingerprint": stage_fingerprint(lr, stage), "finished": True, "metrics": metrics,
            "seconds": round(seconds, 2), "artifacts": artifacts, "recipe_sha256": lr.sha256, **(extra or {})}


def write_stage_record(lr: LoadedRecipe, stage: str, record: dict[str, Any]) -> None:
    """Write `record` as the stage's `stage.json`, with the resolved recipe beside it. Under
    torch.distributed the caller writes from rank 0 only."""
    out = stage_dir(lr, stage)
    atomic_write_text(out / "recipe.toml", lr.to_toml())
    atomic_write_json(out / "stage.json", record)


def is_up_to_date(lr: LoadedRecipe, stage: str) -> bool:
    """Whether `stage` finished, from finished stages, with the fingerprint the recipe gives now,
    and its files exist; a float stage imported with `--from` also needs the file it came from to
    be unchanged where it is still there."""
    record = read_stage_record(lr, stage)
    if not record or record.get("fingerprint") != stage_fingerprint(lr, stage):
        return False
    if record.get("finished") is False or record.get("built_on_unfinished"):
        return False
    source = (record.get("weights_from") or {}) if stage == "float" else {}
    if source.get("via") == "--from" and Path(source["path"]).is_file() \
            and file_sha256(Path(source["path"])) != source.get("sha256"):
        return False
    return all(Path(p).exists() for p in record.get("artifacts", []))


def can_resume(lr: LoadedRecipe, stage: str) -> bool:
    """Whether `stage` is an unfinished training stage of the current settings with a
    `checkpoint-last.pt` to continue from (what `hat run` resumes)."""
    record = read_stage_record(lr, stage)
    return (stage in ("float", "qat") and bool(record) and record.get("finished") is False
            and record.get("fingerprint") == stage_fingerprint(lr, stage)
            and (stage_dir(lr, stage) / "checkpoint-last.pt").exists())


def export_up_to_date(lr: LoadedRecipe, out_dir: Path) -> bool:
    """Whether `out_dir` holds an export of the recipe's own source stage as the recipe gives it now."""
    manifest = out_dir / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") == stage_fingerprint(lr, "export")


def artifact_up_to_date(lr: LoadedRecipe, march: str, opt: int, out_dir: Path) -> bool:
    """Whether `out_dir` holds an artifact compiled from the recipe's current export (of its own
    source stage) with this march/opt."""
    manifest = out_dir / "manifest.json"
    if not manifest.exists():
        return False
    extra = json.loads(manifest.read_text()).get("extra", {})
    return extra.get("fingerprint") == compile_fingerprint(stage_fingerprint(lr, "export"), march, opt)
