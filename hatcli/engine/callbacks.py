"""Small composable objects that the training loop calls at fixed points.

The loop (`hatcli.engine.trainer.Trainer`) only trains; everything else is a callback, called
in list order at each point:

    on_train_begin(trainer)            after a resume is restored
    on_epoch_begin(trainer)
    on_step_end(trainer, loss)         after each optimizer step
    on_validation_end(trainer, metrics)
    on_epoch_end(trainer, record)      record: the epoch's line of metrics.jsonl (add keys to it)
    on_train_end(trainer)

Built-in: `EmaUpdate`, `ProgressBar`, `Validation`, `LrLogger`, `EpochLine`, `MetricLogger`,
`Checkpointer`, `TensorBoardLogger`. A plugin adds its own through the `register_callbacks` hook, and a recipe
switches it on with ``callbacks = [{name = "...", ...}]`` in the stage's table. Callbacks that
write files do so on rank 0 only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hatcli.errors import warn

if TYPE_CHECKING:
    from hatcli.engine.trainer import Trainer


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Training starts (or resumes: the trainer's counters are already restored)."""

    def on_epoch_begin(self, trainer: Trainer) -> None:
        """An epoch starts (`trainer.epoch` is 0-based)."""

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        """One optimizer step is done; `trainer.step` counts them."""

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Validation finished with `metrics`."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """An epoch finished; `record` is its metrics.jsonl line."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Training finished (not called when it was interrupted)."""


class EmaUpdate(Callback):
    """Update the exponential moving average of the weights after every step."""

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        """Fold the new weights into the average."""
        if trainer.ema is not None:
            trainer.ema.update(trainer.raw_model)


class ProgressBar(Callback):
    """On a terminal, a rich bar over all steps of the stage: epoch, loss, lr, images/s, ETA.
    Elsewhere (a log file, CI) no bar: a plain line every `STEP_LINE_EVERY_S` within a long epoch
    (`EpochLine` prints one per epoch). Rank 0 only. Puts `images_per_s` in each epoch's record."""

    STEP_LINE_EVERY_S = 300.0

    def __init__(self) -> None:
        self.progress: Any = None
        self.task: Any = None
        self.tic = 0.0
        self.seen = 0
        self.last_line = 0.0

    def on_train_begin(self, trainer: Trainer) -> None:
        """Start the bar at the step the run (re)starts from."""
        from rich.progress import TextColumn

        from hatcli.progress import WRAP, is_interactive, make_progress

        self.last_line = time.monotonic()
        if not trainer.dist.is_main or not is_interactive():
            return
        columns = TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[rate]:.0f} img/s",
                             table_column=WRAP)
        self.progress = make_progress(columns)
        self.progress.start()
        self.task = self.progress.add_task(trainer.spec.stage, total=trainer.total_steps, completed=trainer.step,
                                           loss=float("nan"), lr=trainer.lr, rate=0.0)

    def on_epoch_begin(self, trainer: Trainer) -> None:
        """Name the epoch in the bar and restart the images/s clock."""
        self.tic, self.seen = time.perf_counter(), 0
        if self.progress is not None:
            self.progress.update(self.task, description=f"{trainer.spec.stage} epoch {trainer.epoch + 1}/{trainer.spec.epochs}")

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        """Advance by one step (off a terminal: a line now and then within a long epoch)."""
        self.seen += trainer.last_batch_size * trainer.dist.world_size
        rate = self.seen / max(1e-9, time.perf_counter() - self.tic)
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=loss, lr=trainer.lr, rate=rate)
        elif trainer.dist.is_main and time.monotonic() - self.last_line >= self.STEP_LINE_EVERY_S:
            from hatcli.progress import print_line

            self.last_line = time.monotonic()
            print_line(f"{trainer.spec.stage} epoch {trainer.epoch + 1}/{trainer.spec.epochs}  "
                       f"step {trainer.batch_in_epoch}/{trainer.steps_per_epoch}  loss {loss:.4f}  "
                       f"lr {trainer.lr:.2e}  {rate:,.0f} img/s")

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Record the epoch's training throughput."""
        self.last_line = time.monotonic()
        record["images_per_s"] = self.seen / max(1e-9, time.perf_counter() - self.tic)

    def on_train_end(self, trainer: Trainer) -> None:
        """Stop drawing."""
        self.close()

    def close(self) -> None:
        """Stop the bar (also used when a run is interrupted)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class EpochLine(Callback):
    """One plain line per epoch on stderr, with every number of its record (rank 0): the stage,
    epoch N/M, loss, the validation metrics, lr, images/s, the time elapsed and the ETA of the
    stage. Runs after the callbacks that fill the record, so a plugin's numbers are on it too."""

    SHOWN_ELSEWHERE = ("epoch", "step", "loss", "lr", "images_per_s")

    def __init__(self) -> None:
        self.tic = 0.0
        self.first_step = 0

    def on_train_begin(self, trainer: Trainer) -> None:
        """Start the clock at the step the run (re)starts from."""
        self.tic, self.first_step = time.perf_counter(), trainer.step

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Print the epoch's line."""
        from hatcli.progress import duration, print_line

        if not trainer.dist.is_main:
            return
        elapsed = time.perf_counter() - self.tic
        done = trainer.step - self.first_step
        eta = elapsed / done * (trainer.total_steps - trainer.step) if done else None
        parts = [f"{trainer.spec.stage} epoch {trainer.epoch}/{trainer.spec.epochs}", f"loss {record['loss']:.4f}"]
        for key, value in record.items():
            if key not in self.SHOWN_ELSEWHERE and isinstance(value, (int, float)) and not isinstance(value, bool):
                parts.append(f"{key} {value}" if isinstance(value, int) else f"{key} {value:.2f}")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        if "images_per_s" in record:
            parts.append(f"{record['images_per_s']:,.0f} img/s")
        parts += [f"elapsed {duration(elapsed)}", f"ETA {duration(eta)}"]
        print_line("  ".join(parts))


class Validation(Callback):
    """Evaluate every `every` epochs and after the last one; puts the metrics in the epoch's record."""

    def __init__(self, every: int = 1) -> None:
        self.every = every

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Validate when due and tell the other callbacks."""
        if trainer.epoch % self.every == 0 or trainer.epoch == trainer.spec.epochs:
            metrics = trainer.validate()
            record.update(metrics)
            for callback in trainer.callbacks:
                callback.on_validation_end(trainer, metrics)


class LrLogger(Callback):
    """Put the learning rate at the end of each epoch into its record."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Add `lr`."""
        record["lr"] = trainer.lr


class MetricLogger(Callback):
    """Append one JSON line per epoch to `metrics.jsonl` (rank 0); a resumed run keeps the file in step."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, trainer: Trainer) -> None:
        """Rewrite the file from the restored history (drops lines of epochs a crash lost)."""
        if trainer.dist.is_main:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in trainer.history), encoding="utf-8")

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Append the epoch's record."""
        if trainer.dist.is_main:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


class Checkpointer(Callback):
    """`checkpoint-last.pt` after each epoch (and every `every_steps` steps); `checkpoint-best.pt`
    whenever the validation metric improves. Rank 0 writes; the others wait for it."""

    def __init__(self, every_steps: int = 0) -> None:
        self.every_steps = every_steps

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        """Save mid-epoch every `every_steps` steps."""
        if self.every_steps and trainer.step % self.every_steps == 0 and trainer.batch_in_epoch < trainer.steps_per_epoch:
            trainer.save(trainer.last_path)

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Keep the best model by the task's primary metric."""
        value = metrics[trainer.primary_metric]
        if value > trainer.best:
            trainer.best = value
            trainer.save(trainer.best_path, metrics=metrics, best=True)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Save the state at the end of the epoch (after the other callbacks ran)."""
        trainer.history.append(record)
        trainer.save(trainer.last_path)


class TensorBoardLogger(Callback):
    """Loss and LR every `every_steps` steps and each epoch's record as TensorBoard scalars.

    Needs the optional `tensorboard` package (``pip install 'hatcli[tensorboard]'``); without
    it this callback writes nothing and says so once (hat trains the same either way). Events
    go to ``<stage dir>/tensorboard`` on rank 0.
    """

    NOT_INSTALLED = ("TensorBoard event files are off: the `tensorboard` package is not installed "
                     "(`pip install 'hatcli[tensorboard]'` turns them on)")

    def __init__(self, log_dir: Path, every_steps: int = 10) -> None:
        self.log_dir = Path(log_dir)
        self.every_steps = every_steps
        self.writer: Any = None

    @staticmethod
    def available() -> bool:
        """Whether the `tensorboard` package is installed."""
        import importlib.util

        return importlib.util.find_spec("tensorboard") is not None

    def on_train_begin(self, trainer: Trainer) -> None:
        """Open the event writer (or say that there is none)."""
        if not trainer.dist.is_main:
            return
        if not self.available():
            warn(self.NOT_INSTALLED)
        else:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=trainer.step or None)

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        """Write the step's loss and LR."""
        if self.writer is not None and trainer.step % self.every_steps == 0:
            self.writer.add_scalar(f"{trainer.spec.stage}/loss", loss, trainer.step)
            self.writer.add_scalar(f"{trainer.spec.stage}/lr", trainer.lr, trainer.step)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Write the epoch's numbers."""
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{trainer.spec.stage}/epoch_{key}", value, trainer.step)
            self.writer.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        """Close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class EarlyStopping(Callback):
    """Stop the stage when the validation metric has not improved by `min_delta` for `patience`
    validations (the built-in plugin registers it as `early_stopping`)."""

    def __init__(self, patience: int = 5, min_delta: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise TypeError(f"patience must be a positive integer, got {patience!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise TypeError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best = -float("inf")
        self.bad = 0

    def on_train_begin(self, trainer: Trainer) -> None:
        """Start from the best metric the (possibly resumed) run has seen."""
        self.best = trainer.best

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Count validations without improvement; ask the trainer to stop after `patience` of them."""
        value = metrics[trainer.primary_metric]
        if value > self.best + self.min_delta:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            trainer.stop_reason = (f"early stopping: {trainer.primary_metric} did not improve by more than "
                                   f"{self.min_delta} in {self.patience} validations")


def default_callbacks(out_dir: Path, val_every: int, checkpoint_every_steps: int,
                      extra: list[Callback] | None = None) -> list[Callback]:
    """The callbacks of a training stage, in calling order: the built-in ones that produce numbers
    (EMA, progress, validation, LR), then `extra` (plugins'), then the ones that write them down
    (the epoch's line, metrics.jsonl, TensorBoard, checkpoints), so a plugin's additions to a
    record are logged too."""
    return [EmaUpdate(), ProgressBar(), Validation(val_every), LrLogger(), *(extra or []), EpochLine(),
            MetricLogger(out_dir / "metrics.jsonl"), TensorBoardLogger(out_dir / "tensorboard"),
            Checkpointer(checkpoint_every_steps)]

