"""Running the stages float -> calibration -> qat -> int_infer, each chaining from the previous one.

Every stage leaves `runs/<task>/<stage>/` with its checkpoint(s), the resolved `recipe.toml`,
`metrics.jsonl` (training stages) and `stage.json` (fingerprint, metrics, time, artifacts,
whether it finished: epochs done of planned); `hatcli.stages` says where these are and what
they mean, the engine trains, quant prepares and converts the graphs.

A training stage keeps `stage.json` at ``"finished": false`` with its epoch count while it runs,
so one stopped by Ctrl-C or `kill -9` is known as unfinished: `hat run` resumes it, and a stage
or command that uses it (or a stage built on it) warns, naming it and how to finish it. Each
stage holds a lock on its folder while it runs, so a second writer stops at once.

Weights from outside hat (`hatcli.engine.weights`) enter as the float stage: `[model] weights`
is what float training starts from (with `float.epochs = 0` the float stage is those weights,
evaluated), and `calibrate(lr, from_path=FILE)` imports a state dict or `.safetensors` file as
the float stage before calibrating, so every later stage, `hat run`, `hat eval --stage float`
and `hat debug` find an ordinary float stage. Its record says where the weights came from
(`weights_from`: path, sha256, format, the load report).
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
from hatcli.engine.weights import WeightsFile, map_weights, read_weights
from hatcli.errors import ArtifactError, DataError, UsageError, warn
from hatcli.inputs import data_path
from hatcli.locking import exclusive, lock_file_for
from hatcli.progress import print_line, track
from hatcli.quant.flow import set_mode
from hatcli.recipe import LoadedRecipe
from hatcli.recipe_checks import build_callbacks
from hatcli.stages import (
    float_fingerprint,
    imported_float,
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


def _checkpoint_meta(lr: LoadedRecipe, stage: str, classes: list[str], num_classes: int,
                     fingerprint: str | None = None) -> dict[str, Any]:
    return {"recipe_sha256": lr.sha256, "fingerprint": fingerprint or stage_fingerprint(lr, stage), "classes": classes,
            "num_classes": num_classes, "family": lr.family.name}


# -- float ---------------------------------------------------------------------------------------


def train_float(lr: LoadedRecipe, resume: bool = False, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train the float model from scratch, or from `[model] weights` (or resume), and keep the best
    checkpoint; with `float.epochs = 0` keep `[model] weights` as they are, evaluated.

    `callbacks` are added to the built-in ones and those the recipe names.
    """
    with stage_lock(lr, "float"):
        return _train_float(lr, resume, callbacks)


def _float_classes(lr: LoadedRecipe, train_loader: Any) -> list[str]:
    """The packed training data's class names (what the float model is built for), checked against
    `model.num_classes` when the recipe sets it."""
    classes = list(train_loader.dataset.classes)
    wanted = lr.model.num_classes
    if wanted is not None and wanted != len(classes):
        raise UsageError(f"`model.num_classes` is {wanted} but {data_path(lr, 'train')} has {len(classes)} classes")
    return classes


def _train_float(lr: LoadedRecipe, resume: bool, callbacks: list[Callback] | None) -> dict[str, Any]:
    tic = time.perf_counter()
    _seed_everything(lr)
    device = training_device(lr)
    train_loader, val_loader = build_loader(lr, "train", device=device), build_loader(lr, "val", device=device)
    classes = _float_classes(lr, train_loader)
    model = lr.family.build_float_model(lr.model, len(classes))
    cfg = lr.recipe.float_
    # this stage's own fingerprint: not that of a float stage imported here before, which it replaces
    extra: dict[str, Any] = {"fingerprint": float_fingerprint(lr)}
    if getattr(lr.model, "weights", None):
        label = f"{lr.path}: model.weights"
        weights = read_weights(Path(lr.model.weights), label)
        extra["weights_from"] = _start_from(model, len(classes), weights, "model.weights", cfg.epochs > 0, label)
    if cfg.epochs == 0:
        return _keep_as_float(lr, model, classes, extra, tic, device)
    spec = _train_spec(lr, "float", cfg, _checkpoint_meta(lr, "float", classes, len(classes), extra["fingerprint"]))
    extra_callbacks = [StageProgress(lr, extra), *build_callbacks(cfg.callbacks, "float.callbacks"),
                       *(callbacks or [])]
    summary = fit(model, lr.family, train_loader, val_loader, spec, resume=resume, callbacks=extra_callbacks,
                  device=device)
    return _finish_training(lr, "float", summary, cfg.epochs, time.perf_counter() - tic, extra)


# -- weights from outside hat ------------------------------------------------------------------


def _start_from(model: torch.nn.Module, num_classes: int, weights: WeightsFile, via: str, trains_after: bool,
                label: str) -> dict[str, Any]:
    """Copy `weights` onto the float `model`, say what did not fit, and return the record's
    `weights_from` entry (path, sha256, format, how it came, the load report)."""
    report = map_weights(model, weights, num_classes, trains_after, label=label)
    if distributed.current().is_main:
        stripped = f", the prefix `{report.stripped_prefix}` stripped" if report.stripped_prefix else ""
        print_line(f"float: weights from {weights.path} ({weights.format}, sha256 {weights.sha256[:12]}): "
                   f"{report.loaded} of the model's {report.total} tensors loaded{stripped}")
        for note in report.notes():
            warn(f"float weights {weights.path.name}: {note}")
        if report.head and not trains_after:
            warn("the replaced head is untrained, so the float model predicts at chance until float training "
                 "learns it: start float training from these weights with `[model] weights`")
    return {"path": str(weights.path.resolve()), "sha256": weights.sha256, "format": weights.format, "via": via,
            "report": report.as_dict()}


def _keep_as_float(lr: LoadedRecipe, model: torch.nn.Module, classes: list[str], extra: dict[str, Any],
                   tic: float, device: torch.device) -> dict[str, Any]:
    """Evaluate `model` on the val set and keep it, untrained, as the float stage's
    `checkpoint-best.pt` (the files of a float stage trained there before are removed with it)."""
    model = model.to(device).eval()
    metrics = evaluate(model, build_loader(lr, "val", device=device), lr.family, description="float eval",
                       config=lr.model)
    folder = stage_dir(lr, "float")
    best = folder / "checkpoint-best.pt"
    if distributed.current().is_main:
        save_checkpoint(best, {"stage": "float", "model": model.state_dict(), "metrics": metrics, "epoch": 0,
                               "weights_from": extra.get("weights_from"),
                               **_checkpoint_meta(lr, "float", classes, len(classes), extra["fingerprint"])})
        for stale in ("checkpoint-last.pt", "metrics.jsonl"):  # a replaced training run's, not these weights'
            (folder / stale).unlink(missing_ok=True)
        shown = "  ".join(f"{name} {value:.2f}" for name, value in metrics.items())
        print_line(f"float: the weights as they are, evaluated: {shown} -> {best}")
    return _finish(lr, "float", metrics, time.perf_counter() - tic, [str(best)],
                   {"epochs": 0, "epochs_planned": 0, **extra})


def import_float(lr: LoadedRecipe, source: Path | WeightsFile) -> dict[str, Any]:
    """Import a weights file (a state dict, a checkpoint holding one, a `.safetensors` file) as the
    float stage: mapped onto the recipe's float model, evaluated on the val set, written as
    `runs/<task>/float/checkpoint-best.pt` with a record naming the file (path, sha256) and the
    load report. A file that does not fit is refused (UsageError) before anything is written."""
    tic = time.perf_counter()
    weights = source if isinstance(source, WeightsFile) else read_weights(Path(source), "--from")
    _seed_everything(lr)  # the replaced head, if any, is initialised the same way every time
    device = training_device(lr)
    classes = _float_classes(lr, build_loader(lr, "train", device=device))
    model = lr.family.build_float_model(lr.model, len(classes))
    extra = {"fingerprint": float_fingerprint(lr, weights.sha256),
             "weights_from": _start_from(model, len(classes), weights, "--from", False, "--from")}
    with stage_lock(lr, "float"):
        return _keep_as_float(lr, model, classes, extra, tic, device)


def float_source(lr: LoadedRecipe, from_path: Path | None) -> Path | None:
    """What calibration starts from, given `--from from_path`: a hat float checkpoint is used as it
    is (returned); any other weights file is imported as the float stage (`import_float`) and None
    is returned, so calibration starts from that stage."""
    if from_path is None:
        return None
    weights = read_weights(Path(from_path), "--from")
    if weights.format == "hat checkpoint":
        if weights.hat_stage != "float":
            raise UsageError(f"--from: {from_path} is a hat {weights.hat_stage} checkpoint; calibration starts "
                             f"from float weights (`--stage qat --from` takes a calibration checkpoint)")
        return Path(from_path)
    import_float(lr, weights)
    return None


def make_float(lr: LoadedRecipe) -> dict[str, Any]:
    """Make the float stage as the run folder and the recipe say (what `hat run` does): import again
    the file a `--from` import came from (`hatcli.stages.imported_float`), else train it."""
    source = imported_float(lr)
    if source is None:
        return train_float(lr)
    path = Path(source["path"])
    if not path.is_file():
        raise ArtifactError(f"the float stage holds weights imported from {path}, which is gone: import them again "
                            f"with `hat train {lr.path} --stage calibration --from FILE`, or train the float stage "
                            f"with `hat train {lr.path} --stage float`")
    print_line(f"float: importing {path} again (the float stage holds weights imported from it; "
               f"`hat train {lr.path} --stage float` trains one instead)")
    return import_float(lr, path)


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
    `from_path`: a hat float checkpoint to start from, or weights from outside hat, which are
    imported as the float stage first (`float_source`).
    """
    from_path = float_source(lr, from_path)
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
