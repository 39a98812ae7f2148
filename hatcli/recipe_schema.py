"""The typed schema of a recipe: every table and key a recipe may contain.

Unknown keys are errors everywhere (`extra="forbid"`). The `[model]` table is validated by the
family the recipe names, since each family owns its own options.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Base of every recipe table: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PackConfig(Strict):
    """How `hat run` produces the dataset when `data.root` holds none yet."""

    kind: str = "shapes"
    task: Literal["classification", "detection"] = "classification"
    num_images: int = Field(1200, gt=0)
    image_size: int = Field(64, ge=16)
    seed: int = 0


class DataConfig(Strict):
    """Where the packed data is and how batches are made."""

    root: str = "data/shapes"
    """Folder that holds the packed databases (paths are relative to the working directory)."""
    train: str = "train_lmdb"
    val: str = "val_lmdb"
    input_size: tuple[int, int] = (64, 64)
    """Height and width the network sees."""
    batch_size: int = Field(64, gt=0)
    num_workers: int = Field(0, ge=0)
    mean: tuple[float, float, float] = (128.0, 128.0, 128.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    """Normalization on the 0..255 scale, applied after the transforms; HAT uses 128/128."""
    train_transforms: list[dict[str, Any]] = []
    """Per-image transforms in the DataLoader workers (uint8 in, uint8 out); default: Resize."""
    val_transforms: list[dict[str, Any]] = []
    batch_transforms: list[dict[str, Any]] = []
    """Per-batch transforms on the model's device, before ToFloat and Normalize (e.g. RGBToYUV444)."""
    pack: PackConfig | None = None


class OptimizerConfig(Strict):
    """Optimizer and learning-rate schedule of a training stage."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(4e-5, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[int] = []
    gamma: float = 0.1


class FloatStage(Strict):
    """`--stage float`: ordinary training."""

    epochs: int = Field(10, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    val_every: int = Field(1, gt=0)


class CalibrationStage(Strict):
    """`--stage calibration`: observers only, eval mode, from the float checkpoint."""

    num_batches: int = Field(16, gt=0)
    observer: Literal["minmax"] = "minmax"


class QatStage(Strict):
    """`--stage qat`: fake-quant fine-tuning from the calibration checkpoint."""

    enabled: bool = True
    epochs: int = Field(1, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3, schedule="constant", weight_decay=0.0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    val_every: int = Field(1, gt=0)


class QuantConfig(Strict):
    """Quantization target and precision choices."""

    march: str = "nash_e"
    int16: list[str] = []
    """Module name patterns (fnmatch) whose outputs are computed in int16."""


class DeployConfig(Strict):
    """Export, compile and perf settings."""

    opt: int = Field(3, ge=0, le=3)
    perf_runs: int = Field(50, gt=0)


class Recipe(Strict):
    """A whole resolved recipe."""

    task: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of the run: outputs go to `<work_dir>/<task>/<stage>/`."""
    work_dir: str = "runs"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: dict[str, Any]
    float_: FloatStage = Field(FloatStage(), alias="float")
    calibration: CalibrationStage = CalibrationStage()
    qat: QatStage = QatStage()
    quant: QuantConfig = QuantConfig()
    deploy: DeployConfig = DeployConfig()
