"""Where each stage's files are, and which checkpoint a stage (or an export) means."""

from __future__ import annotations

from pathlib import Path

from hatcli.errors import ArtifactError, UsageError
from hatcli.quant.march import is_march_file
from hatcli.recipe import LoadedRecipe
from hatcli.stages.names import EXPORTABLE_STAGES, quant_source


def stage_dir(lr: LoadedRecipe, stage: str) -> Path:
    """Output folder of one stage."""
    return lr.run_dir / stage


def default_export_dir(lr: LoadedRecipe) -> Path:
    """Where `hat export` writes by default."""
    return lr.run_dir / "export"


def default_compile_dir(lr: LoadedRecipe, march: str, opt: int) -> Path:
    """Where `hat compile` writes by default (a march given as a profile file: by its file stem)."""
    label = Path(march).stem if is_march_file(march) else march
    return lr.run_dir / "compile" / f"{label}-O{opt}"


def checkpoint_path(lr: LoadedRecipe, stage: str) -> Path:
    """The checkpoint that stands for `stage`: its best, else its last, else its only one
    (calibration writes `checkpoint.pt`); an ArtifactError when the stage has none yet."""
    folder = stage_dir(lr, stage)
    for name in ("checkpoint-best.pt", "checkpoint-last.pt", "checkpoint.pt"):
        if (folder / name).exists():
            return folder / name
    raise ArtifactError(f"no checkpoint in {folder}; run that stage first")


def export_source(lr: LoadedRecipe, stage: str | None = None) -> str:
    """The stage to export: `stage`, or the recipe's (QAT, calibration when `qat.enabled = false`).

    Checked before any work: UsageError for another stage name or for `qat` with QAT disabled,
    ArtifactError (saying how to get one) when the stage has no checkpoint yet.
    """
    if stage is not None and stage not in EXPORTABLE_STAGES:
        raise UsageError(f"--stage: cannot export `{stage}`; choose calibration (post-training quantization) "
                         "or qat")
    source = stage or quant_source(lr)
    if source == "qat" and not lr.recipe.qat.enabled:
        raise UsageError(f"{lr.path}: QAT is disabled (`qat.enabled = false`); export the calibration model "
                         f"with `hat export {lr.path}` (or `--stage calibration`)")
    folder = stage_dir(lr, source)
    if not any(folder.glob("checkpoint*.pt")):
        if source == "qat" and any(stage_dir(lr, "calibration").glob("checkpoint*.pt")):
            raise ArtifactError(f"no QAT checkpoint in {folder}: train it with `hat train {lr.path} --stage qat`, "
                                f"or export the calibration (post-training quantization) model with "
                                f"`hat export {lr.path} --stage calibration`")
        raise ArtifactError(f"no {source} checkpoint in {folder}; run `hat train {lr.path} --stage {source}` first")
    return source
