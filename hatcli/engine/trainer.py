"""The training loop shared by the float and QAT stages, and evaluation in torch.

`Trainer.fit` runs optimizer steps and calls its callbacks (hatcli/engine/callbacks.py), which
do everything else: EMA, progress, validation, logs, checkpoints. The trainer's own job is to
make a run *resumable exactly*:

- a checkpoint holds the model, optimizer, AMP scaler, EMA, epoch, step, the batch reached in
  the current epoch, the best metric, the history, the torch RNG states and the stage's
  fingerprint (recipe hash), and is written atomically;
- data order and augmentations are a function of (seed, epoch, sample) (see
  hatcli/engine/sampling.py), so a resumed run - after Ctrl-C, or `kill -9` and a mid-epoch
  checkpoint - replays the rest of the epoch exactly; with `deterministic = true` the final
  weights are bitwise equal to those of an uninterrupted run;
- under `torch.distributed` the model is wrapped in DistributedDataParallel, metrics are
  all-reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hatcli.atomic import check_writable
from hatcli.engine import distributed
from hatcli.engine.callbacks import Callback, ProgressBar, default_callbacks
from hatcli.engine.checkpoint import load_checkpoint, save_checkpoint
from hatcli.engine.schedule import LrSchedule, build_optimizer
from hatcli.errors import ArtifactError, HatError, Interrupted
from hatcli.family import FamilyConfig, ModelFamily
from hatcli.progress import make_progress
from hatcli.recipe_schema import EmaConfig, OptimizerConfig

PRIMARY_METRIC = {"classification": "top1", "detection": "mAP", "segmentation": "mIoU"}


@dataclass
class TrainSpec:
    """What one training stage needs besides the model and data."""

    epochs: int
    optimizer: OptimizerConfig
    label_smoothing: float
    val_every: int
    out_dir: Path
    stage: str
    extra: dict[str, Any] = field(default_factory=dict)
    """Saved in every checkpoint (recipe hash, fingerprint, classes, ...)."""
    ema: EmaConfig | None = None
    grad_clip: float | None = None
    """Clip the gradients' global L2 norm to this value."""
    amp: bool = False
    """Mixed precision (autocast + loss scaling); CUDA only."""
    checkpoint_every_steps: int = 0
    sync_bn: bool = False
    model_config: FamilyConfig | None = None
    """The recipe's `[model]` table, handed to the family's loss and metric."""


def evaluate(model: Callable, loader: Any, family: ModelFamily, description: str = "eval",
             config: FamilyConfig | None = None, transient: bool = False) -> dict[str, float]:
    """Run `model` over `loader` and return the family's metrics (percentages), merged across ranks.

    `config` is the recipe's `[model]` table, for families whose decoding depends on it.
    `transient`: the progress leaves nothing behind (validation, whose numbers the epoch's line shows).
    """
    return run_metric(model, loader, family, description, config, transient).compute()


def run_metric(model: Callable, loader: Any, family: ModelFamily, description: str = "eval",
               config: FamilyConfig | None = None, transient: bool = False) -> Any:
    """Run `model` over `loader` and return the family's metric object with every batch added and
    all ranks merged (what `evaluate` computes; callers that want more than `compute()`, such as a
    metric's `per_class()` table, read it here)."""
    metric = family.build_metric(getattr(loader, "dataset", None), config)
    info = distributed.current()
    with torch.no_grad(), make_progress(transient=transient) as progress:
        task = progress.add_task(description, total=len(loader), visible=info.is_main)  # type: ignore[arg-type]
        for images, targets in loader:
            metric.update(model(images), targets)
            progress.advance(task)
    metric.merge_across_ranks()
    return metric


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Train `model` on `train_loader` for `spec.epochs`, validating on `val_loader`.

    `set_mode(model, "train"|"eval")` switches prepared (fake-quant) graphs, which ignore
    `.train()`. `callbacks` run after the built-in ones that compute (EMA, validation) and
    before those that write (metrics.jsonl, checkpoints); see `default_callbacks`.
    """

    def __init__(self, model: torch.nn.Module, family: ModelFamily, train_loader: Any, val_loader: Any,
                 spec: TrainSpec, *, set_mode: Callable | None = None, callbacks: Iterable[Callback] = (),
                 device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.family = family
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.set_mode = set_mode
        self.device = torch.device(device)
        self.dist = distributed.current()
        model = model.to(self.device)
        if spec.sync_bn and self.dist.enabled:
            from hatcli.engine.sync_bn import convert_sync_batchnorm

            model = convert_sync_batchnorm(model, self.device)
        self.raw_model = model
        self.model: torch.nn.Module = model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.optimizer = build_optimizer(model, spec.optimizer, where=f"{spec.stage}.optimizer")
        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise HatError(f"{spec.stage}: the training data gives no batch; lower `data.batch_size`")
        self.total_steps = self.steps_per_epoch * spec.epochs
        self.schedule = LrSchedule(spec.optimizer, self.steps_per_epoch, spec.epochs)
        self.ema = None
        if spec.ema is not None:
            from hatcli.engine.ema import ModelEMA

            self.ema = ModelEMA(model, decay=spec.ema.decay, tau=spec.ema.tau)
        self.amp = spec.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.primary_metric = PRIMARY_METRIC[family.task]
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps done
        self.batch_in_epoch = 0  # batches done in the epoch under way
        self.best = -math.inf
        self.metrics: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.loss_sum = 0.0
        self.seen = 0
        self.lr = spec.optimizer.lr
        self.last_batch_size = 0
        self.stop_reason: str | None = None
        """Set by a callback (e.g. early stopping) to end the stage after the current epoch."""
        self.last_path = spec.out_dir / "checkpoint-last.pt"
        self.best_path = spec.out_dir / "checkpoint-best.pt"
        self.callbacks: list[Callback] = default_callbacks(spec.out_dir, spec.val_every, spec.checkpoint_every_steps,
                                                           list(callbacks))

    # -- state -----------------------------------------------------------------------------

    def eval_model(self) -> torch.nn.Module:
        """The model that is validated and kept as "best": the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.raw_model

    def _mode(self, module: torch.nn.Module, train: bool) -> None:
        if self.set_mode is not None:
            self.set_mode(module, "train" if train else "eval")
        else:
            module.train(train)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, plus the stage's metadata."""
        return {
            "stage": self.spec.stage, "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "best": self.best, "metrics": self.metrics, "history": self.history,
            "loss_sum": self.loss_sum, "seen": self.seen, "rng": _rng_state(), **self.spec.extra,
        }

    def save(self, path: Path, metrics: dict[str, float] | None = None, best: bool = False) -> None:
        """Write a checkpoint atomically on rank 0; a failed write leaves the previous one intact.

        The best checkpoint holds the evaluated model (the EMA weights when EMA is on), which is
        what the next stage starts from.
        """
        if self.dist.is_main:
            payload = self.state_dict()
            if best:
                payload["model"] = self.eval_model().state_dict()
                payload["metrics"] = metrics or self.metrics
            try:
                save_checkpoint(path, payload)
            except OSError as exc:
                raise HatError(f"{self.spec.stage}: could not write {path} ({exc.strerror or exc}); "
                               f"the previous checkpoint there is intact") from None
        distributed.barrier()

    def restore(self, path: Path) -> None:
        """Load a `checkpoint-last.pt` written by this stage with the same recipe, to continue it."""
        state = load_checkpoint(path)
        wanted = self.spec.extra.get("fingerprint")
        if wanted is not None and state.get("fingerprint") not in (None, wanted):
            raise ArtifactError(f"{path} was written with other recipe settings for this stage; "
                                f"drop --resume to start the stage again")
        self.raw_model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:  # other parameter groups: other `param_rules` or another model
            raise ArtifactError(f"{path}: its optimizer state does not fit this stage's parameter groups ({exc}); "
                                f"drop --resume to start the stage again") from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch_in_epoch = state.get("batch_in_epoch", 0)
        self.best, self.metrics = state.get("best", -math.inf), state.get("metrics", {})
        self.history = list(state.get("history", []))
        self.loss_sum, self.seen = state.get("loss_sum", 0.0), state.get("seen", 0)
        if "rng" in state:
            _set_rng_state(state["rng"])

    # -- loop ------------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Evaluate the eval model on the validation data (all ranks), then go back to training."""
        model = self.eval_model()
        self._mode(model, False)
        self.metrics = evaluate(model, self.val_loader, self.family, description=f"{self.spec.stage} val",
                                config=self.spec.model_config, transient=True)
        self._mode(self.raw_model, True)
        return self.metrics

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _train_step(self, images: torch.Tensor, targets: Any) -> float:
        self.lr = self.schedule.apply(self.optimizer, self.step)
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp else nullcontext()
        with autocast:
            loss = self.family.loss(self.model(images), targets, label_smoothing=self.spec.label_smoothing,
                                    config=self.spec.model_config)
        if not torch.isfinite(loss):
            where = f"; last good checkpoint: {self.last_path}" if self.last_path.exists() else ""
            raise HatError(f"{self.spec.stage}: loss is {loss.item()} at step {self.step + 1} "
                           f"(epoch {self.epoch + 1}); lower the learning rate{where}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.spec.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.spec.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to `spec.epochs` (continuing from `checkpoint-last.pt` with `resume`); return a summary.

        Ctrl-C saves `checkpoint-last.pt` at the step reached, then propagates as `Interrupted` (a
        KeyboardInterrupt) naming the step and the file.
        """
        if resume and self.last_path.exists():
            self.restore(self.last_path)
        elif self.dist.is_main:
            for stale in (self.last_path, self.best_path):
                stale.unlink(missing_ok=True)
        self._call("on_train_begin")
        try:
            self._mode(self.raw_model, True)
            while self.epoch < self.spec.epochs:
                self.train_loader.set_epoch(self.epoch, skip_batches=self.batch_in_epoch)
                self._call("on_epoch_begin")
                for images, targets in self.train_loader:
                    loss = self._train_step(images, targets)
                    self.last_batch_size = len(images)
                    self.step += 1
                    self.batch_in_epoch += 1
                    self.loss_sum += loss * len(images)
                    self.seen += len(images)
                    self._call("on_step_end", loss)
                self.epoch += 1
                self.batch_in_epoch = 0
                totals = distributed.all_reduce_sum(torch.tensor([self.loss_sum, float(self.seen)], dtype=torch.float64))
                record: dict[str, Any] = {"epoch": self.epoch, "step": self.step,
                                          "loss": float(totals[0] / max(1.0, float(totals[1])))}
                self.loss_sum, self.seen = 0.0, 0
                self._call("on_epoch_end", record)
                if self.stop_reason is not None:
                    break
        except KeyboardInterrupt:
            self._close_progress()
            self.save(self.last_path)
            raise Interrupted(f"{self.spec.stage}: interrupted at step {self.step} (epoch {self.epoch + 1} of "
                              f"{self.spec.epochs}); saved {self.last_path}") from None
        except BaseException:
            self._close_progress()
            raise
        self._call("on_train_end")
        if self.stop_reason is not None and self.dist.is_main:
            from hatcli.progress import console

            console.print(f"[yellow]{self.spec.stage}: stopped after epoch {self.epoch} of {self.spec.epochs}[/]: "
                          f"{self.stop_reason}", soft_wrap=True)
        self._mode(self.raw_model, False)
        return {"metrics": self.metrics, "best": self.best, "epochs": self.epoch, "stopped": self.stop_reason,
                "history": self.history,
                "checkpoint_last": str(self.last_path), "checkpoint_best": str(self.best_path)}

    def _close_progress(self) -> None:
        for callback in self.callbacks:
            if isinstance(callback, ProgressBar):
                callback.close()


def fit(model: torch.nn.Module, family: ModelFamily, train_loader: Any, val_loader: Any, spec: TrainSpec,
        set_mode: Callable | None = None, resume: bool = False, callbacks: Iterable[Callback] = (),
        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Build a `Trainer` and run it (see `Trainer.fit`)."""
    check_writable(spec.out_dir)
    trainer = Trainer(model, family, train_loader, val_loader, spec, set_mode=set_mode, callbacks=callbacks,
                      device=device)
    return trainer.fit(resume=resume)
