"""Running the stages float -> calibration -> qat -> int_infer, each chaining from the previous one.

Every stage leaves `runs/<task>/<stage>/` with its checkpoint(s), the resolved `recipe.toml`,
`metrics.jsonl` (training stages) and `stage.json` (fingerprint, metrics, time, artifacts,
whether it finished: epochs done of planned); `hatcli.stages` says where these are and what
they mean, the engine trains, quant prepares and converts the graphs.

A training stage keeps `stage.json` at ``"finished": false`` with its epoch count while it runs,
so one stopped by Ctrl-C or `kill -9` is known as unfinished: `hat run` resumes it, and a stage
or command that uses it (or a stage built on it) warns, naming it and how to finish it. Each
stage holds a lock on its folder while it runs, so a second writer stops at once.
"""

from __future__ import annotations

import itertools
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from hatcli.atomic import check_writable
from hatcli.engine import distributed
from hatcli.engine.callbacks import Callback
from hatcli.engine.checkpoint import load_checkpoint, save_checkpoint
from hatcli.engine.loaders import build_loader
from hatcli.engine.trainer import TrainSpec, evaluate, fit
from hatcli.errors import DataError, UsageError
from hatcli.inputs import data_path
from hatcli.locking import exclusive, lock_file_for
from hatcli.progress import track
from hatcli.quant.flow import set_mode
from hatcli.recipe import LoadedRecipe
from hatcli.recipe_checks import build_callbacks
from hatcli.stages import (
    quant_source,
    stage_dir,
    stage_fingerprint,
    stage_record,
    unfinished_labels,
    warn_unfinished,
    write_stage_record,
)
from hatcli.workflows.stage_models import build_prepared, evaluate_stage, load_prepared


def _finish(lr: LoadedRecipe, stage: str, metrics: dict, seconds: float, artifacts: list[str],
            extra: dict | None = None) -> dict[str, Any]:
    """Record `stage` as finished (rank 0 writes) once every rank has got here."""
    record = stage_record(lr, stage, metrics, seconds, artifacts, extra)
    if distributed.current().is_main:
        write_stage_record(lr, stage, record)
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
        if not distributed.current().is_main:
            return
        artifacts = [str(p) for p in (trainer.best_path, trainer.last_path) if p.exists()]
        write_stage_record(self.lr, trainer.spec.stage, {
            **self.base, "metrics": trainer.metrics, "seconds": round(time.perf_counter() - self.tic, 2),
            "artifacts": artifacts, "epochs": trainer.epoch})

    def on_train_begin(self, trainer: Any) -> None:
        """Say the stage is under way (from the epoch a resumed run restarts at)."""
        self.base = stage_record(self.lr, trainer.spec.stage, {}, 0.0, [],
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
    return {"recipe_sha256": lr.sha256, "fingerprint": stage_fingerprint(lr, stage), "classes": classes,
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
    extra_callbacks = [StageProgress(lr), *build_callbacks(cfg.callbacks, "float.callbacks"), *(callbacks or [])]
    summary = fit(model, lr.family, train_loader, val_loader, spec, resume=resume, callbacks=extra_callbacks,
                  device=device)
    return _finish_training(lr, "float", summary, cfg.epochs, time.perf_counter() - tic)


# -- calibration and QAT -----------------------------------------------------------------------


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
    tic = time.perf_counter()
    built_on = [] if from_path is not None else warn_unfinished(lr, "float", "calibration")
    _seed_everything(lr)
    device = training_device(lr)
    prepared, state, unquantized = build_prepared(lr, from_path)
    prepared = prepared.to(device)
    set_mode(prepared, "calibrate")
    loader = build_loader(lr, "train", shuffle=True, device=device)
    num = min(lr.recipe.calibration.num_batches, len(loader))
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
    if not lr.recipe.qat.enabled:
        raise UsageError("QAT is disabled in this recipe (`qat.enabled = false`); the integer model "
                         "comes from the calibration stage")
    with stage_lock(lr, "qat"):
        return _train_qat(lr, resume, from_path, callbacks)


def _train_qat(lr: LoadedRecipe, resume: bool, from_path: Path | None,
               callbacks: list[Callback] | None) -> dict[str, Any]:
    tic = time.perf_counter()
    built_on = [] if from_path is not None else warn_unfinished(lr, "calibration", "qat")
    _seed_everything(lr)
    device = training_device(lr)
    prepared, state = load_prepared(lr, "calibration", from_path)
    cfg = lr.recipe.qat
    spec = _train_spec(lr, "qat", cfg, _checkpoint_meta(lr, "qat", state["classes"], state["num_classes"]))
    extra = {"built_on_unfinished": built_on}
    extra_callbacks = [StageProgress(lr, extra), *build_callbacks(cfg.callbacks, "qat.callbacks"), *(callbacks or [])]
    summary = fit(prepared, lr.family, build_loader(lr, "train", device=device), build_loader(lr, "val", device=device),
                  spec, set_mode=set_mode, resume=resume, callbacks=extra_callbacks, device=device)
    return _finish_training(lr, "qat", summary, cfg.epochs, time.perf_counter() - tic, extra)


# -- integer model -------------------------------------------------------------------------------


def evaluate_int_infer(lr: LoadedRecipe) -> dict[str, Any]:
    """Evaluate the integer program and record it as the `int_infer` stage (for `hat run`)."""
    tic = time.perf_counter()
    metrics = evaluate_stage(lr, "int_infer")["metrics"]
    return _finish(lr, "int_infer", metrics, time.perf_counter() - tic, [],
                   {"built_on_unfinished": unfinished_labels(lr, quant_source(lr))})
