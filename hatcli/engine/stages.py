"""The stages float -> calibration -> qat -> int_infer, each chaining from the previous one.

Every stage leaves `runs/<task>/<stage>/` with its checkpoint(s), the resolved `recipe.toml`,
`metrics.jsonl` (training stages) and `stage.json` (fingerprint, metrics, time, artifacts,
whether it finished: epochs done of planned). The fingerprint covers the recipe sections a stage
depends on and its upstream stage, so `hat run` can tell which stages are up to date.

A training stage keeps `stage.json` at ``"finished": false`` with its epoch count while it runs,
so one stopped by Ctrl-C or `kill -9` is known as unfinished: `hat run` resumes it, and a stage
or command that uses it (or a stage built on it) warns, naming it and how to finish it. Each
stage holds a lock on its folder while it runs, so a second writer stops at once.
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from hatcli.atomic import atomic_write_json, atomic_write_text
from hatcli.engine import distributed
from hatcli.engine.callbacks import Callback, plugin_callbacks
from hatcli.engine.checkpoint import load_checkpoint, save_checkpoint
from hatcli.engine.loaders import build_loader
from hatcli.inputs import data_path
from hatcli.engine.trainer import TrainSpec, check_writable, evaluate, fit
from hatcli.errors import ArtifactError, DataError, UsageError, warn
from hatcli.locking import exclusive, lock_file_for
from hatcli.quant.march import load_march
from hatcli.recipe import LoadedRecipe, recipe_hash

TRAIN_STAGES = ("float", "calibration", "qat")
EVAL_STAGES = ("float", "calibration", "qat", "int_infer", "deploy")
UPSTREAM = {"float": None, "calibration": "float", "qat": "calibration"}
"""The stage each training stage starts from."""


def stage_dir(lr: LoadedRecipe, stage: str) -> Path:
    """Output folder of one stage."""
    return lr.run_dir / stage


def read_stage_record(lr: LoadedRecipe, stage: str) -> dict[str, Any] | None:
    """The `stage.json` a finished stage wrote, or None."""
    import json

    path = stage_dir(lr, stage) / "stage.json"
    return json.loads(path.read_text()) if path.exists() else None


def _data_checksums(lr: LoadedRecipe) -> dict[str, Any]:
    from hatcli.data.lmdb_format import open_packed

    out = {}
    for split in ("train", "val"):
        path = data_path(lr, split)
        out[split] = open_packed(path).meta.get("checksums") if path.exists() else None
    return out


def quant_source(lr: LoadedRecipe) -> str:
    """The stage whose checkpoint becomes the integer model: qat, or calibration when QAT is off."""
    return "qat" if lr.recipe.qat.enabled else "calibration"


def fingerprint(lr: LoadedRecipe, stage: str) -> str:
    """Hash of everything `stage`'s output depends on (recipe sections + upstream stage)."""
    if stage == "float":
        return recipe_hash([lr.section_hash("seed", "data", "model", "float"), _data_checksums(lr)])
    if stage == "calibration":
        return recipe_hash([fingerprint(lr, "float"), lr.section_hash("calibration", "quant")])
    if stage == "qat":
        return recipe_hash([fingerprint(lr, "calibration"), lr.section_hash("qat")])
    if stage in ("export", "int_infer"):  # both are the integer program of the same checkpoint
        return recipe_hash([fingerprint(lr, quant_source(lr)), lr.resolved["data"]["input_size"]])
    raise ValueError(stage)


def is_up_to_date(lr: LoadedRecipe, stage: str) -> bool:
    """Whether `stage` finished, from finished stages, with the fingerprint the recipe gives now,
    and its files exist."""
    record = read_stage_record(lr, stage)
    if not record or record.get("fingerprint") != fingerprint(lr, stage):
        return False
    if record.get("finished") is False or record.get("built_on_unfinished"):
        return False
    return all(Path(p).exists() for p in record.get("artifacts", []))


def can_resume(lr: LoadedRecipe, stage: str) -> bool:
    """Whether `stage` is an unfinished training stage of the current settings with a
    `checkpoint-last.pt` to continue from (what `hat run` resumes)."""
    record = read_stage_record(lr, stage)
    return (stage in ("float", "qat") and bool(record) and record.get("finished") is False
            and record.get("fingerprint") == fingerprint(lr, stage)
            and (stage_dir(lr, stage) / "checkpoint-last.pt").exists())


def _unfinished_chain(lr: LoadedRecipe, stage: str) -> list[tuple[str, dict[str, Any]]]:
    """`stage` and the stages it is built on whose record says unfinished or built on unfinished."""
    found = []
    current: str | None = stage
    while current is not None:
        record = read_stage_record(lr, current) or {}
        if record.get("finished") is False or record.get("built_on_unfinished"):
            found.append((current, record))
        current = UPSTREAM.get(current)
    return found


def unfinished(lr: LoadedRecipe, stage: str) -> list[str]:
    """What is unfinished in `stage` and the stages it is built on, one sentence each, naming the
    stage, how far it got and the command that finishes it; empty when all finished."""
    sentences = []
    for name, record in _unfinished_chain(lr, stage):
        command = f"hat train {lr.path} --stage {name}"
        if record.get("finished") is False:
            how = (f"finish it with `{command} --resume`" if can_resume(lr, name)
                   else f"train it again with `{command}`")
            sentences.append(f"the {name} stage is unfinished (epoch {record.get('epochs')}/"
                             f"{record.get('epochs_planned')}); {how}")
        else:
            sentences.append(f"the {name} stage was built on an unfinished stage "
                             f"({', '.join(record['built_on_unfinished'])}); build it again with `{command}`")
    return sentences


def _unfinished_labels(lr: LoadedRecipe, stage: str) -> list[str]:
    """Short names of the unfinished stages under `stage`, e.g. ``float at epoch 2/14``, for a record."""
    labels: list[str] = []
    for name, record in _unfinished_chain(lr, stage):
        if record.get("finished") is False:
            labels.append(f"{name} at epoch {record.get('epochs')}/{record.get('epochs_planned')}")
        labels += [label for label in record.get("built_on_unfinished") or [] if label not in labels]
    return labels


def warn_unfinished(lr: LoadedRecipe, stage: str, use: str) -> list[str]:
    """Warn (`hatcli.errors.warn`) that `use` goes on from `stage` though it or a stage it is
    built on is unfinished; returns their short names, for the new stage's record."""
    for sentence in unfinished(lr, stage):
        warn(f"{use} uses an unfinished stage: {sentence}")
    return _unfinished_labels(lr, stage)


def _record(lr: LoadedRecipe, stage: str, metrics: dict, seconds: float, artifacts: list[str],
            extra: dict | None = None) -> dict[str, Any]:
    return {"stage": stage, "fingerprint": fingerprint(lr, stage), "finished": True, "metrics": metrics,
            "seconds": round(seconds, 2), "artifacts": artifacts, "recipe_sha256": lr.sha256, **(extra or {})}


def _write_record(lr: LoadedRecipe, stage: str, record: dict[str, Any]) -> None:
    if distributed.current().is_main:
        out = stage_dir(lr, stage)
        atomic_write_text(out / "recipe.toml", lr.to_toml())
        atomic_write_json(out / "stage.json", record)


def _finish(lr: LoadedRecipe, stage: str, metrics: dict, seconds: float, artifacts: list[str],
            extra: dict | None = None) -> dict[str, Any]:
    record = _record(lr, stage, metrics, seconds, artifacts, extra)
    _write_record(lr, stage, record)
    distributed.barrier()
    return record


def _finish_training(lr: LoadedRecipe, stage: str, summary: dict[str, Any], planned: int, seconds: float,
                     extra: dict | None = None) -> dict[str, Any]:
    best = Path(summary["checkpoint_best"])
    metrics = load_checkpoint(best)["metrics"]
    return _finish(lr, stage, metrics, seconds, [str(best), summary["checkpoint_last"]],
                   {"epochs": summary["epochs"], "epochs_planned": planned, "stopped": summary["stopped"],
                    **(extra or {})})


class StageProgress(Callback):
    """Keeps a training stage's `stage.json` at ``"finished": false`` with the epochs done while it
    runs (rank 0), so that a stage stopped anyhow is known as unfinished and how far it got."""

    def __init__(self, lr: LoadedRecipe, extra: dict[str, Any] | None = None) -> None:
        self.lr = lr
        self.extra = extra or {}
        self.tic = time.perf_counter()
        self.base: dict[str, Any] = {}

    def _write(self, trainer: Any) -> None:
        artifacts = [str(p) for p in (trainer.best_path, trainer.last_path) if p.exists()]
        _write_record(self.lr, trainer.spec.stage, {
            **self.base, "metrics": trainer.metrics, "seconds": round(time.perf_counter() - self.tic, 2),
            "artifacts": artifacts, "epochs": trainer.epoch})

    def on_train_begin(self, trainer: Any) -> None:
        """Say the stage is under way (from the epoch a resumed run restarts at)."""
        self.base = _record(self.lr, trainer.spec.stage, {}, 0.0, [],
                            {"finished": False, "epochs_planned": trainer.spec.epochs, **self.extra})
        self._write(trainer)

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        """Count the epoch."""
        self._write(trainer)


def stage_lock(lr: LoadedRecipe, stage: str) -> Any:
    """Hold `stage`'s folder for this process (rank 0) while it writes there; a second writer gets a
    LockedError naming the folder and the holder."""
    folder = stage_dir(lr, stage)
    check_writable(folder)  # an unwritable work_dir is named as such, not as a lock failure
    if not distributed.current().is_main:
        return nullcontext()
    return exclusive(lock_file_for(folder), folder)


def training_device(lr: LoadedRecipe) -> torch.device:
    """The device the recipe trains on: `cuda` (this process's GPU under torch.distributed) or `cpu`."""
    wanted = lr.recipe.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UsageError("`device = \"cuda\"` but this machine has no usable CUDA device; use \"auto\" or \"cpu\"")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", distributed.current().local_rank)


def _seed_everything(lr: LoadedRecipe) -> None:
    """Seed torch and switch deterministic kernels on when the recipe asks for them."""
    torch.manual_seed(lr.recipe.seed)
    if lr.recipe.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _train_spec(lr: LoadedRecipe, stage: str, cfg: Any, extra: dict[str, Any]) -> TrainSpec:
    return TrainSpec(epochs=cfg.epochs, optimizer=cfg.optimizer, label_smoothing=cfg.label_smoothing,
                     val_every=cfg.val_every, out_dir=stage_dir(lr, stage), stage=stage, extra=extra,
                     ema=cfg.ema, grad_clip=cfg.grad_clip, amp=getattr(cfg, "amp", False),
                     checkpoint_every_steps=cfg.checkpoint_every_steps, sync_bn=getattr(cfg, "sync_bn", False),
                     model_config=lr.model)


def _checkpoint_meta(lr: LoadedRecipe, stage: str, classes: list[str], num_classes: int) -> dict[str, Any]:
    return {"recipe_sha256": lr.sha256, "fingerprint": fingerprint(lr, stage), "classes": classes,
            "num_classes": num_classes, "family": lr.family.name}


# -- float ---------------------------------------------------------------------------------------


def train_float(lr: LoadedRecipe, resume: bool = False, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train the float model from scratch (or resume) and keep the best checkpoint.

    `callbacks` are added to the built-in ones and those the recipe names.
    """
    with stage_lock(lr, "float"):
        return _train_float(lr, resume, callbacks)


def _train_float(lr: LoadedRecipe, resume: bool, callbacks: list[Callback] | None) -> dict[str, Any]:
    tic = time.perf_counter()
    _seed_everything(lr)
    device = training_device(lr)
    train_loader, val_loader = build_loader(lr, "train", device=device), build_loader(lr, "val", device=device)
    classes = list(train_loader.dataset.classes)
    wanted = lr.model.num_classes
    if wanted is not None and wanted != len(classes):
        raise UsageError(f"`model.num_classes` is {wanted} but {data_path(lr, 'train')} has {len(classes)} classes")
    model = lr.family.build_float_model(lr.model, len(classes))
    cfg = lr.recipe.float_
    spec = _train_spec(lr, "float", cfg, _checkpoint_meta(lr, "float", classes, len(classes)))
    extra_callbacks = [StageProgress(lr), *plugin_callbacks(cfg.callbacks, "float.callbacks"), *(callbacks or [])]
    summary = fit(model, lr.family, train_loader, val_loader, spec, resume=resume, callbacks=extra_callbacks,
                  device=device)
    return _finish_training(lr, "float", summary, cfg.epochs, time.perf_counter() - tic)


def _best_or_last(folder: Path) -> Path:
    for name in ("checkpoint-best.pt", "checkpoint-last.pt", "checkpoint.pt"):
        if (folder / name).exists():
            return folder / name
    raise ArtifactError(f"no checkpoint in {folder}; run that stage first")


def load_float_model(lr: LoadedRecipe, path: Path | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the float model and load the float stage's best checkpoint (or `path`)."""
    state = load_checkpoint(path or _best_or_last(stage_dir(lr, "float")))
    model = lr.family.build_float_model(lr.model, state["num_classes"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ArtifactError(f"float checkpoint does not fit the recipe's model "
                            f"({str(exc).splitlines()[0]}); retrain with `hat train ... --stage float`") from None
    return model.eval(), state


# -- calibration and QAT -----------------------------------------------------------------------


def int16_patterns(lr: LoadedRecipe, march: Any) -> list[str]:
    """The modules quantized to int16: the recipe's `quant.int16`, then the family's own wishes
    (`int16_outputs`) where the march has int16 activations (elsewhere they are preferences only)."""
    patterns = list(lr.recipe.quant.int16)
    if march.quant.allow_int16:
        patterns += [p for p in lr.family.int16_outputs(lr.model) if p not in patterns]
    return patterns


def build_prepared(lr: LoadedRecipe, float_path: Path | None = None) -> tuple[torch.fx.GraphModule, dict, list[str]]:
    """The prepared (fake-quant) deploy graph built from the float checkpoint."""
    from hatcli.quant.flow import prepare_quantized

    model, state = load_float_model(lr, float_path)
    march = load_march(lr.recipe.quant.march)
    prepared, quantizer = prepare_quantized(lr.family, model, tuple(lr.recipe.data.input_size), march,
                                            int16_patterns(lr, march), observer=lr.recipe.calibration.observer,
                                            percentile=lr.recipe.calibration.percentile,
                                            activation_scales=lr.recipe.qat.activation_scales)
    for op in quantizer.unquantized:
        warnings.warn(f"left in float (runs as CPU fallback): {op}", stacklevel=2)
    return prepared, state, quantizer.unquantized


def load_prepared(lr: LoadedRecipe, stage: str, path: Path | None = None) -> tuple[torch.fx.GraphModule, dict]:
    """Rebuild the prepared graph and load the calibration or QAT checkpoint into it."""
    prepared, _, _ = build_prepared(lr)
    state = load_checkpoint(path or _best_or_last(stage_dir(lr, stage)))
    prepared.load_state_dict(state["model"])
    return prepared, state


def _check_input_size(lr: LoadedRecipe, images: torch.Tensor) -> None:
    """The quantized graph is exported at `data.input_size`: refuse other batch sizes clearly."""
    want = tuple(lr.recipe.data.input_size)
    if tuple(images.shape[-2:]) != want:
        raise DataError(f"training batches are {images.shape[-2]}x{images.shape[-1]} but the quantized graph "
                        f"takes `data.input_size` {list(want)}: make `data.train_transforms` end at that size "
                        f"(e.g. Resize, or RandomCrop / Pad to {list(want)})")


def calibrate(lr: LoadedRecipe, from_path: Path | None = None) -> dict[str, Any]:
    """Record activation ranges over `calibration.num_batches` batches in eval mode; report PTQ accuracy.

    Warns when the float stage it starts from is unfinished, and says so in its record.
    """
    with stage_lock(lr, "calibration"):
        return _calibrate(lr, from_path)


def _calibrate(lr: LoadedRecipe, from_path: Path | None) -> dict[str, Any]:
    from hatcli.quant.flow import set_mode

    tic = time.perf_counter()
    built_on = [] if from_path is not None else warn_unfinished(lr, "float", "calibration")
    _seed_everything(lr)
    device = training_device(lr)
    prepared, state, unquantized = build_prepared(lr, from_path)
    prepared = prepared.to(device)
    set_mode(prepared, "calibrate")
    loader = build_loader(lr, "train", shuffle=True, device=device)
    num = min(lr.recipe.calibration.num_batches, len(loader))
    from hatcli.progress import track

    with torch.no_grad():
        batches = itertools.islice(loader, num)
        if distributed.current().is_main:
            batches = track(batches, num, "calibration")
        for images, _ in batches:
            _check_input_size(lr, images)
            prepared(images)
    # Every rank saw its own shard: agree on the ranges (min of minimums, max of maximums) so
    # all ranks hold the same quantization parameters.
    distributed.sync_observers(prepared)
    set_mode(prepared, "eval")
    metrics = evaluate(prepared, build_loader(lr, "val", device=device), lr.family, description="calibration val",
                       config=lr.model)
    out = stage_dir(lr, "calibration") / "checkpoint.pt"
    meta = _checkpoint_meta(lr, "calibration", state["classes"], state["num_classes"])
    if distributed.current().is_main:
        save_checkpoint(out, {"stage": "calibration", "model": prepared.state_dict(), "metrics": metrics, **meta})
    return _finish(lr, "calibration", metrics, time.perf_counter() - tic, [str(out)],
                   {"float_ops": unquantized, "num_batches": num, "built_on_unfinished": built_on})


def train_qat(lr: LoadedRecipe, resume: bool = False, from_path: Path | None = None,
              callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Fine-tune the calibrated graph with fake quantization (activation scales frozen, or
    learned from the calibrated ones with `qat.activation_scales = "learned"`)."""
    from hatcli.quant.flow import set_mode

    if not lr.recipe.qat.enabled:
        raise UsageError("QAT is disabled in this recipe (`qat.enabled = false`); the integer model "
                         "comes from the calibration stage")
    with stage_lock(lr, "qat"):
        return _train_qat(lr, resume, from_path, callbacks)


def _train_qat(lr: LoadedRecipe, resume: bool, from_path: Path | None,
               callbacks: list[Callback] | None) -> dict[str, Any]:
    from hatcli.quant.flow import set_mode

    tic = time.perf_counter()
    built_on = [] if from_path is not None else warn_unfinished(lr, "calibration", "qat")
    _seed_everything(lr)
    device = training_device(lr)
    prepared, state = load_prepared(lr, "calibration", from_path)
    cfg = lr.recipe.qat
    spec = _train_spec(lr, "qat", cfg, _checkpoint_meta(lr, "qat", state["classes"], state["num_classes"]))
    extra = {"built_on_unfinished": built_on}
    extra_callbacks = [StageProgress(lr, extra), *plugin_callbacks(cfg.callbacks, "qat.callbacks"), *(callbacks or [])]
    summary = fit(prepared, lr.family, build_loader(lr, "train", device=device), build_loader(lr, "val", device=device),
                  spec, set_mode=set_mode, resume=resume, callbacks=extra_callbacks, device=device)
    return _finish_training(lr, "qat", summary, cfg.epochs, time.perf_counter() - tic, extra)


# -- integer model and evaluation ---------------------------------------------------------------


def integer_model(lr: LoadedRecipe, stage: str | None = None) -> tuple[torch.fx.GraphModule, dict]:
    """The integer program converted from `stage`'s checkpoint (default `quant_source`: QAT, or
    calibration when QAT is off); warns when that stage, or one it is built on, is unfinished."""
    from hatcli.quant.flow import convert_to_integer

    stage = stage or quant_source(lr)
    warn_unfinished(lr, stage, "the integer model")
    prepared, state = load_prepared(lr, stage)
    return convert_to_integer(prepared), state


def stage_model(lr: LoadedRecipe, stage: str, artifact: Path | None = None) -> tuple[Callable, list[str]]:
    """A callable batch -> outputs for `stage`, and the class names."""
    from hatcli.quant.flow import set_mode

    if stage in ("float", "calibration", "qat"):
        warn_unfinished(lr, stage, f"the {stage} model")
    elif stage == "deploy" and artifact is None:
        warn_unfinished(lr, quant_source(lr), "the compiled artifact")
    if stage == "float":
        model, state = load_float_model(lr)
    elif stage in ("calibration", "qat"):
        model, state = load_prepared(lr, stage)
        set_mode(model, "eval")
    elif stage == "int_infer":
        from hatcli.quant.integer import integer_program

        reference, state = integer_model(lr)
        model = integer_program(reference)
    elif stage == "deploy":
        from hatcli.deploy.runtime import load_artifact

        folder = artifact or default_compile_dir(lr, lr.recipe.quant.march, lr.recipe.deploy.opt)
        if not Path(folder).exists():
            raise ArtifactError(f"no compiled artifact at {folder}; run `hat compile {lr.path}` first")
        runner = load_artifact(folder)
        classes = runner.manifest.get("extra", {}).get("classes") or runner.manifest.get("classes", [])
        return _onnx_callable(runner), classes
    else:
        raise UsageError(f"unknown stage `{stage}`; choose one of {', '.join(EVAL_STAGES)}")
    return model, state["classes"]


def _onnx_callable(runner: Any) -> Callable:
    """batch -> outputs through ONNX Runtime: one tensor for a single-output model, else a tuple in
    the deploy model's output order (what the torch stages return)."""
    def run(images: torch.Tensor) -> Any:
        outputs = [torch.from_numpy(out) for out in runner.run(images.detach().cpu().numpy())]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run


def evaluate_int_infer(lr: LoadedRecipe) -> dict[str, Any]:
    """Evaluate the integer program and record it as the `int_infer` stage (for `hat run`)."""
    tic = time.perf_counter()
    metrics = evaluate_stage(lr, "int_infer")["metrics"]
    return _finish(lr, "int_infer", metrics, time.perf_counter() - tic, [],
                   {"built_on_unfinished": _unfinished_labels(lr, quant_source(lr))})


def default_export_dir(lr: LoadedRecipe) -> Path:
    """Where `hat export` writes by default."""
    return lr.run_dir / "export"


def default_compile_dir(lr: LoadedRecipe, march: str, opt: int) -> Path:
    """Where `hat compile` writes by default."""
    return lr.run_dir / "compile" / f"{march}-O{opt}"


def evaluate_stage(lr: LoadedRecipe, stage: str, artifact: Path | None = None) -> dict[str, Any]:
    """Evaluate one stage on the packed val set: `{"stage": ..., "metrics": {...}}`."""
    model, _ = stage_model(lr, stage, artifact)
    metrics = evaluate(model, build_loader(lr, "val"), lr.family, description=f"{stage} eval", config=lr.model)
    return {"stage": stage, "metrics": metrics}
