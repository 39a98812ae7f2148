"""Resolving what a deploy command works on: a recipe's export/artifact, or a model file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatcli.commands._options import load
from hatcli.errors import ArtifactError, UsageError


def resolve_onnx(recipe: Path | None, model: Path | None, overrides: list[str] | None) -> tuple[Path, Any]:
    """The ONNX file to check or compile: `--model FILE`, or the recipe's exported model.onnx."""
    if (recipe is None) == (model is None):
        raise UsageError("give either a RECIPE or --model FILE (not both)")
    if model is not None:
        if not model.is_file():
            raise UsageError(f"--model: no such file: {model}")
        return model, None
    from hatcli.stages import default_export_dir

    lr = load(recipe, overrides)
    onnx_path = default_export_dir(lr) / "model.onnx"
    if not onnx_path.exists():
        raise ArtifactError(f"no exported model at {onnx_path}; run `hat export {recipe}` first")
    return onnx_path, lr


def march_name(march: str | None, lr: Any) -> str:
    """The march to use: the option, else the recipe's `quant.march`."""
    if march:
        return march
    if lr is not None:
        return lr.recipe.quant.march
    raise UsageError("--march is required with --model (a march from `hat march list`, or a profile .toml)")
