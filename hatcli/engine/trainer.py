"""The training loop shared by the float and QAT stages, and evaluation in torch."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import TextColumn
from torch.utils.data import DataLoader

from hatcli.engine.checkpoint import load_checkpoint, save_checkpoint
from hatcli.engine.schedule import build_optimizer, lr_factor, set_lr
from hatcli.errors import HatError, Interrupted
from hatcli.family import ModelFamily
from hatcli.metrics.classification import TopKAccuracy
from hatcli.progress import make_progress
from hatcli.recipe_schema import OptimizerConfig

PRIMARY_METRIC = {"classification": "top1", "detection": "mAP"}


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
    """Saved in every checkpoint (recipe hash, classes, ...)."""


def evaluate(model: Callable, loader: DataLoader, family: ModelFamily, description: str = "eval") -> dict[str, float]:
    """Run `model` over `loader` and return the task's metrics (percentages)."""
    if family.task != "classification":
        raise HatError(f"evaluation of {family.task} models is not available in this version")
    metric = TopKAccuracy()
    with torch.no_grad(), make_progress() as progress:
        task = progress.add_task(description, total=len(loader))
        for images, labels in loader:
            metric.update(model(images), labels)
            progress.advance(task)
    return metric.compute()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _set_train(model: torch.nn.Module, train: bool, set_mode: Callable | None) -> None:
    if set_mode is not None:
        set_mode(model, "train" if train else "eval")
    else:
        model.train(train)


def fit(model: torch.nn.Module, family: ModelFamily, train_loader: DataLoader, val_loader: DataLoader,
        spec: TrainSpec, set_mode: Callable | None = None, resume: bool = False) -> dict[str, Any]:
    """Train `model` for `spec.epochs`, validating and checkpointing (last + best) as it goes.

    `set_mode(model, "train"|"eval")` switches prepared (fake-quant) graphs, which ignore
    `.train()`. Ctrl-C saves `checkpoint-last.pt` before it propagates. Returns a summary.
    """
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], spec.optimizer)
    metrics_file = spec.out_dir / "metrics.jsonl"
    key = PRIMARY_METRIC[family.task]
    start_epoch, step, best, history = 0, 0, -math.inf, []
    last_path, best_path = spec.out_dir / "checkpoint-last.pt", spec.out_dir / "checkpoint-best.pt"
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, best = state["epoch"], state["step"], state.get("best", -math.inf)
    elif metrics_file.exists():
        metrics_file.unlink()
    steps_per_epoch = len(train_loader)

    def checkpoint(path: Path, epoch: int, metrics: dict[str, float]) -> None:
        save_checkpoint(path, {"stage": spec.stage, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "epoch": epoch, "step": step, "best": best, "metrics": metrics, **spec.extra})

    epoch, metrics = start_epoch, {}
    loss_text = TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[rate]:.0f} img/s")
    try:
        with make_progress(loss_text) as progress:
            bar = progress.add_task(spec.stage, total=steps_per_epoch * spec.epochs, completed=step,
                                    loss=float("nan"), lr=spec.optimizer.lr, rate=0.0)
            for epoch in range(start_epoch, spec.epochs):
                _set_train(model, True, set_mode)
                tic, seen, total_loss = time.perf_counter(), 0, 0.0
                progress.update(bar, description=f"{spec.stage} epoch {epoch + 1}/{spec.epochs}")
                if hasattr(train_loader, "set_epoch"):
                    train_loader.set_epoch(epoch)
                for images, targets in train_loader:
                    lr = set_lr(optimizer, spec.optimizer.lr, lr_factor(spec.optimizer, step, steps_per_epoch, spec.epochs))
                    loss = family.loss(model(images), targets, label_smoothing=spec.label_smoothing)
                    if not torch.isfinite(loss):
                        where = f"; last good checkpoint: {last_path}" if last_path.exists() else ""
                        raise HatError(f"{spec.stage}: loss is {loss.item()} at step {step} "
                                       f"(epoch {epoch + 1}); lower the LR{where}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    seen += len(images)
                    total_loss += loss.item() * len(images)
                    rate = seen / max(1e-9, time.perf_counter() - tic)
                    progress.update(bar, advance=1, loss=loss.item(), lr=lr, rate=rate)
                record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "loss": total_loss / max(1, seen),
                                          "lr": lr, "images_per_s": rate}
                if (epoch + 1) % spec.val_every == 0 or epoch + 1 == spec.epochs:
                    _set_train(model, False, set_mode)
                    metrics = evaluate(model, val_loader, family, description=f"{spec.stage} val")
                    record.update(metrics)
                    if metrics[key] > best:
                        best = metrics[key]
                        checkpoint(best_path, epoch + 1, metrics)
                _append_jsonl(metrics_file, record)
                history.append(record)
                checkpoint(last_path, epoch + 1, metrics)
    except KeyboardInterrupt:
        step = epoch * steps_per_epoch  # a resumed run restarts the interrupted epoch
        checkpoint(last_path, epoch, metrics)
        raise Interrupted(f"{spec.stage}: interrupted in epoch {epoch + 1}; saved {last_path}; "
                          f"continue with `--resume`") from None
    _set_train(model, False, set_mode)
    return {"metrics": metrics, "best": best, "epochs": spec.epochs, "history": history,
            "checkpoint_last": str(last_path), "checkpoint_best": str(best_path)}
