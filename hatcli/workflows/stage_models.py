"""Which model a stage means, loaded: the float model, the prepared (fake-quant) graph of
calibration or QAT, the integer program, or the compiled artifact on ONNX Runtime; and the
evaluation of one of them on the packed val set."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hatcli.deploy.runtime import load_artifact
from hatcli.engine.checkpoint import load_checkpoint
from hatcli.engine.loaders import build_loader
from hatcli.engine.trainer import run_metric
from hatcli.errors import ArtifactError, UsageError
from hatcli.quant import flow
from hatcli.plugins import quant_schemes
from hatcli.quant.integer import integer_program
from hatcli.quant.low_bit.plan import LayerRule, QuantPlan
from hatcli.quant.low_bit.schemes import MARCH
from hatcli.quant.march import load_march
from hatcli.recipe import LoadedRecipe
from hatcli.stages import EVAL_STAGES, checkpoint_path, default_compile_dir, quant_source, warn_unfinished


def load_float_model(lr: LoadedRecipe, path: Path | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the float model and load the float stage's best checkpoint (or `path`)."""
    state = load_checkpoint(path or checkpoint_path(lr, "float"))
    model = lr.family.build_float_model(lr.model, state["num_classes"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ArtifactError(f"float checkpoint does not fit the recipe's model "
                            f"({str(exc).splitlines()[0]}); retrain with `hat train ... --stage float`") from None
    return model.eval(), state


def int16_patterns(lr: LoadedRecipe, march: Any) -> list[str]:
    """The modules quantized to int16: the recipe's `quant.int16`, then the family's own wishes
    (`int16_outputs`) where the march has int16 activations (elsewhere they are preferences only)."""
    patterns = list(lr.recipe.quant.int16)
    if march.quant.allow_int16:
        patterns += [p for p in lr.family.int16_outputs(lr.model) if p not in patterns]
    return patterns


def quant_plan(lr: LoadedRecipe) -> tuple[QuantPlan, dict[str, Any]]:
    """The recipe's low-bit plan (`[quant] scheme`, bits, `[[quant.layers]]`) and the scheme
    objects it names, built from the registered `QuantSchemeSpec`s."""
    quant = lr.recipe.quant
    rules = tuple(LayerRule(r.pattern, r.scheme, r.weight_bits, r.activation_bits) for r in quant.layers)
    plan = QuantPlan(scheme=quant.scheme, weight_bits=quant.weight_bits, activation_bits=quant.activation_bits,
                     weight_groups=quant.weight_groups, keep_first_last=quant.keep_first_last,
                     real_skip=quant.real_skip, rules=rules)
    registry = quant_schemes()
    names = {quant.scheme} | {r.scheme for r in quant.layers if r.scheme}
    return plan, {name: registry.get(name).factory() for name in sorted(names) if name != MARCH}


def prepare_recipe_model(lr: LoadedRecipe, model: torch.nn.Module) -> tuple[torch.fx.GraphModule, Any]:
    """The prepared (fake-quant) deploy graph of float `model` with the recipe's march, int16
    patterns, observers and low-bit plan, and the quantizer (`layer_bits`: its low-bit layers;
    also recorded in the graph, `hatcli.quant.low_bit_records.low_bit_layers`)."""
    march = load_march(lr.recipe.quant.march)
    plan, schemes = quant_plan(lr)
    return flow.prepare_quantized(lr.family, model, tuple(lr.recipe.data.input_size), march,
                                  int16_patterns(lr, march), observer=lr.recipe.calibration.observer,
                                  percentile=lr.recipe.calibration.percentile,
                                  activation_scales=lr.recipe.qat.activation_scales,
                                  plan=plan, schemes=schemes)


def build_prepared(lr: LoadedRecipe, float_path: Path | None = None) -> tuple[torch.fx.GraphModule, dict, list[str]]:
    """The prepared (fake-quant) deploy graph built from the float checkpoint; its low-bit layers
    are in the graph (`hatcli.quant.low_bit_records.low_bit_layers`), and the integer program
    converted from it keeps them."""
    model, state = load_float_model(lr, float_path)
    prepared, quantizer = prepare_recipe_model(lr, model)
    for op in quantizer.unquantized:
        warnings.warn(f"left in float (runs as CPU fallback): {op}", stacklevel=2)
    return prepared, state, quantizer.unquantized


def load_prepared(lr: LoadedRecipe, stage: str, path: Path | None = None) -> tuple[torch.fx.GraphModule, dict]:
    """Rebuild the prepared graph and load the calibration or QAT checkpoint into it."""
    state = load_checkpoint(path or checkpoint_path(lr, stage))
    if path is not None and state.get("stage") not in ("calibration", "qat"):
        raise UsageError(f"--from: {path} is not a hat calibration checkpoint, which `--stage qat --from` takes "
                         f"(weights from outside hat go in as float: `--stage calibration --from {path}`)")
    prepared, _, _ = build_prepared(lr)
    prepared.load_state_dict(state["model"])
    return prepared, state


def integer_model(lr: LoadedRecipe, stage: str | None = None) -> tuple[torch.fx.GraphModule, dict]:
    """The integer program converted from `stage`'s checkpoint (default `quant_source`: QAT, or
    calibration when QAT is off); warns when that stage, or one it is built on, is unfinished."""
    stage = stage or quant_source(lr)
    warn_unfinished(lr, stage, "the integer model")
    prepared, state = load_prepared(lr, stage)
    return flow.convert_to_integer(prepared), state


def stage_model(lr: LoadedRecipe, stage: str, artifact: Path | None = None,
                runtime: str | None = None) -> tuple[Callable, list[str]]:
    """A callable batch -> outputs for `stage`, and the class names; the deploy stage runs on the
    registered runtime `runtime` (default ONNX Runtime)."""
    if stage in ("float", "calibration", "qat"):
        warn_unfinished(lr, stage, f"the {stage} model")
    elif stage == "deploy" and artifact is None:
        warn_unfinished(lr, quant_source(lr), "the compiled artifact")
    if stage == "float":
        model, state = load_float_model(lr)
    elif stage in ("calibration", "qat"):
        model, state = load_prepared(lr, stage)
        flow.set_mode(model, "eval")
    elif stage == "int_infer":
        reference, state = integer_model(lr)
        model = integer_program(reference, load_march(lr.recipe.quant.march).quant.accumulator_bits)
    elif stage == "deploy":
        folder = artifact or default_compile_dir(lr, lr.recipe.quant.march, lr.recipe.deploy.opt)
        if not Path(folder).exists():
            raise ArtifactError(f"no compiled artifact at {folder}; run `hat compile {lr.path}` first")
        runner = load_artifact(folder, runtime=runtime)
        classes = runner.manifest.get("extra", {}).get("classes") or runner.manifest.get("classes", [])
        return artifact_callable(runner), classes
    else:
        raise UsageError(f"unknown stage `{stage}`; choose one of {', '.join(EVAL_STAGES)}")
    return model, state["classes"]


def artifact_callable(runner: Any) -> Callable:
    """batch -> outputs through a loaded artifact (`load_artifact`, on its runtime): one tensor for a
    single-output model, else a tuple in the deploy model's output order (what the torch stages
    return)."""
    def run(images: torch.Tensor) -> Any:
        outputs = [torch.from_numpy(out) for out in runner.run(images.detach().cpu().numpy())]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run


def evaluate_stage(lr: LoadedRecipe, stage: str, artifact: Path | None = None,
                   runtime: str | None = None) -> dict[str, Any]:
    """Evaluate one stage on the packed val set: `{"stage": ..., "metrics": {...}}` (with the
    `runtime` that ran the deploy stage when one was asked for)."""
    model, _ = stage_model(lr, stage, artifact, runtime)
    metric = run_metric(model, build_loader(lr, "val"), lr.family, description=f"{stage} eval", config=lr.model)
    result = {"stage": stage, "metrics": metric.compute(),
              **({"runtime": runtime} if stage == "deploy" and runtime else {})}
    figure, values = metric.per_class() if hasattr(metric, "per_class") else ("", {})
    if values:
        result["per_class"] = {"metric": figure, "values": values}
    return result
