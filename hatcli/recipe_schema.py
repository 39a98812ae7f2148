"""The typed schema of a recipe: every table and key a recipe may contain.

Unknown keys are errors everywhere (`extra="forbid"`). The `[model]` table is validated by the
family the recipe names, since each family owns its own options. `hatcli.recipe` validates in
strict mode, so a value keeps its TOML type (a whole number is still accepted for a float).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

_FOLDER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")


def _one_folder_name(value: str) -> str:
    if not _FOLDER_NAME.fullmatch(value):
        raise ValueError("must be one folder name: 1 to 255 letters, digits, `_`, `-` or `.`, "
                         "not starting with `.` or `-` (no `/`, `..` or spaces)")
    return value


FolderName = Annotated[str, AfterValidator(_one_folder_name)]
"""A string used as one path component (a run or database folder): it can never leave its parent."""

Seed = Annotated[int, Field(ge=0, lt=2**32)]
"""A random seed numpy, torch and Python all take: 0 <= seed < 2**32."""

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class Strict(BaseModel):
    """Base of every recipe table: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PackConfig(Strict):
    """How `hat run` produces the dataset when `data.root` holds none yet."""

    kind: str = "shapes"
    task: Literal["classification", "detection", "segmentation"] = "classification"
    num_images: int = Field(1200, gt=0)
    image_size: int = Field(64, ge=16)
    seed: Seed = 0


class DataConfig(Strict):
    """Where the packed data is and how batches are made."""

    root: str = "data/shapes"
    """Folder that holds the packed databases (paths are relative to the working directory)."""
    train: FolderName = "train_lmdb"
    """Name of the training database inside `root` (one folder name)."""
    val: FolderName = "val_lmdb"
    input_size: tuple[PositiveInt, PositiveInt] = (64, 64)
    """Height and width the network sees."""
    batch_size: int = Field(64, gt=0)
    num_workers: int = Field(0, ge=0)
    mean: tuple[float, float, float] = (128.0, 128.0, 128.0)
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (128.0, 128.0, 128.0)
    """Normalization on the 0..255 scale, applied after the transforms; HAT uses 128/128."""
    train_transforms: list[dict[str, Any]] = []
    """Per-image transforms in the DataLoader workers (uint8 in, uint8 out); default: Resize."""
    val_transforms: list[dict[str, Any]] = []
    batch_transforms: list[dict[str, Any]] = []
    """Per-batch transforms on the model's device, before ToFloat and Normalize (e.g. RGBToYUV444)."""
    pack: PackConfig | None = None


class ParamRule(Strict):
    """One entry of `param_rules`: the optimizer settings of the parameters whose name matches.

    `pattern` is matched (`fnmatch`, case-sensitive) against each parameter's qualified name as
    `model.named_parameters()` gives it (`layer1.0.conv.weight`, `fc.bias`; in QAT the learned
    activation scales are `activation_post_process_<n>.scale`). The first rule that matches a
    parameter decides its settings; what a rule leaves out keeps the stage's value.
    """

    pattern: str = Field(min_length=1)
    """`fnmatch` pattern on the parameter's qualified name: `*` any text (dots included), `?` one
    character, `[ab]` one of a set (`*.bias`, `fc.*`, `*.clip_val`)."""
    weight_decay: float | None = Field(None, ge=0)
    """Weight decay of the matching parameters; it overrides `weight_decay_weights_only` and the
    `no_weight_decay` of quantizer modules, which otherwise force 0."""
    lr_scale: float | None = Field(None, gt=0)
    """Multiplies the stage's `lr` for the matching parameters (the schedule scales the result)."""
    lr: float | None = Field(None, gt=0)
    """Base learning rate of the matching parameters instead of the stage's `lr` (scaled by the
    schedule like it); give `lr` or `lr_scale`, not both."""

    @model_validator(mode="after")
    def _one_lr(self) -> ParamRule:
        if self.lr is not None and self.lr_scale is not None:
            raise ValueError("give either lr or lr_scale in a param rule, not both")
        if self.lr is None and self.lr_scale is None and self.weight_decay is None:
            raise ValueError(f"param rule `{self.pattern}` sets nothing: give weight_decay, lr_scale or lr")
        return self


RESTART_DEFAULTS = {"restart_epochs": 10.0, "restart_mult": 1.0}
"""What `schedule = "cosine_restarts"` uses for the restart keys a recipe leaves out."""


class OptimizerConfig(Strict):
    """Optimizer and learning-rate schedule of a training stage.

    The LR at iteration `step` is `lr * warmup(step) * decay(step)` (see `hatcli.engine.schedule`):
    a linear warm-up over the first `warmup_iters` (or `warmup_epochs`) iterations, then the
    `schedule`, which for `cosine` and `poly` runs from the end of warm-up to the end of training.
    `param_rules` give some parameters another weight decay or base LR.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    """Base learning rate of every parameter group (unless a `param_rules` entry sets another)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum (unused by AdamW)."""
    nesterov: bool = False
    """SGD Nesterov momentum (only when `momentum > 0`)."""
    weight_decay: float = Field(4e-5, ge=0)
    """L2 penalty (SGD) or decoupled weight decay (AdamW)."""
    weight_decay_weights_only: bool = False
    """Apply `weight_decay` only to parameters with more than one dimension (conv and linear
    weights); biases, BatchNorm/LayerNorm weights, PReLU slopes and other 1-d or scalar parameters
    get no weight decay."""
    param_rules: list[ParamRule] = []
    """Per-parameter settings: `[{pattern = "*.bias", weight_decay = 0.0}, {pattern = "fc.*",
    lr_scale = 0.1}]`. Each trainable parameter takes the first rule whose `pattern` matches its
    qualified name; a rule's `weight_decay` wins over `weight_decay_weights_only` and over the
    quantizers' `no_weight_decay`. A pattern that matches no parameter of the model is an error
    when the stage starts."""
    schedule: Literal["cosine", "step", "poly", "constant", "cosine_restarts"] = "cosine"
    """Decay after warm-up. `cosine`: `min + (1 - min) * (1 + cos(pi * p)) / 2`; `poly`:
    `min + (1 - min) * (1 - p) ** power`, where `p` is the fraction of the post-warm-up iterations
    done and `min` is `min_lr_factor`; `step`: multiplied by `gamma` at each of `milestones`;
    `constant`: no decay; `cosine_restarts`: cosine with warm restarts (SGDR), one cosine from 1
    to `min` per cycle of `restart_epochs`, each cycle `restart_mult` times longer than the last."""
    power: float = Field(1.0, gt=0)
    """Exponent of the `poly` schedule (1: linear decay)."""
    min_lr_factor: float = Field(0.0, ge=0, lt=1)
    """`cosine` and `poly` decay towards `min_lr_factor * lr` (reached at the end of training);
    `cosine_restarts` reaches it at the end of every cycle."""
    restart_epochs: float | None = Field(None, gt=0)
    """`cosine_restarts` only: length of the first cycle in epochs (SGDR's `T_0`; fractions
    allowed, rounded to whole iterations, at least 1); default 10."""
    restart_mult: float | None = Field(None, ge=1)
    """`cosine_restarts` only: each cycle is `restart_mult` times longer than the previous one
    (SGDR's `T_mult`, >= 1); default 1 (all cycles equally long)."""
    warmup_epochs: float = Field(0.0, ge=0)
    """Linear warm-up length in epochs (fractions allowed; rounded to whole iterations)."""
    warmup_iters: int = Field(0, ge=0)
    """Linear warm-up length in iterations; give this or `warmup_epochs`, not both."""
    warmup_factor: float = Field(0.0, ge=0, le=1)
    """Warm-up starting point: over `W` warm-up iterations the factor at iteration `step < W` is
    `warmup_factor + (1 - warmup_factor) * (step + 1) / W`, which is exactly 1 at `step = W - 1`."""
    by_epoch: bool = False
    """Evaluate the decay once per epoch, at the epoch's first iteration (piecewise constant
    within an epoch, like HAT's by-epoch LR updaters); warm-up stays per iteration."""
    milestones: list[int] = []
    """Epochs at which the `step` schedule multiplies the LR by `gamma`: strictly increasing, > 0;
    milestone `m` takes effect when `m` epochs are done."""
    gamma: float = 0.1
    """Factor of the `step` schedule at each milestone."""

    @field_validator("milestones")
    @classmethod
    def _increasing_milestones(cls, value: list[int]) -> list[int]:
        if any(m <= 0 for m in value):
            raise ValueError("milestones must be positive epoch numbers")
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError("milestones must be strictly increasing")
        return value

    @model_validator(mode="after")
    def _one_warmup(self) -> OptimizerConfig:
        if self.warmup_epochs > 0 and self.warmup_iters > 0:
            raise ValueError("give either warmup_epochs or warmup_iters, not both")
        return self

    @model_validator(mode="after")
    def _restart_keys_need_restarts(self) -> OptimizerConfig:
        given = [key for key in RESTART_DEFAULTS if getattr(self, key) is not None]
        if self.schedule != "cosine_restarts":
            if given:
                verb, pronoun = ("are", "them") if len(given) > 1 else ("is", "it")
                raise ValueError(f"{' and '.join(given)} {verb} only for schedule = \"cosine_restarts\" "
                                 f"(the schedule is \"{self.schedule}\"): remove {pronoun} or use that schedule")
            return self
        for key, default in RESTART_DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, default)  # so the resolved recipe shows it
        return self


class EmaConfig(Strict):
    """Exponential moving average of the weights (validated and kept as "best" instead of the raw weights)."""

    decay: float = Field(0.9998, gt=0, lt=1)
    tau: float = Field(2000.0, ge=0)
    """Warm-up of the decay in steps: the effective decay is decay * (1 - exp(-updates / tau))."""


class TrainingStage(Strict):
    """What the float and QAT stages share: epochs, optimizer and the training-loop options."""

    epochs: int = Field(10, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    val_every: int = Field(1, gt=0)
    ema: EmaConfig | None = None
    """`[float.ema]` switches the moving average on."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the gradients' global L2 norm to this value."""
    checkpoint_every_steps: int = Field(0, ge=0)
    """Also save `checkpoint-last.pt` every N steps (0: at epoch ends and on Ctrl-C only)."""
    callbacks: list[dict[str, Any]] = []
    """Plugin callbacks: `[{name = "...", arg = value}]` (see `hat plugins`)."""


class FloatStage(TrainingStage):
    """`--stage float`: ordinary training."""

    epochs: int = Field(10, ge=0)
    """Epochs to train; 0 trains none: the float stage is then `[model] weights`, imported and evaluated."""
    amp: bool = False
    """Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); ignored on CPU."""
    sync_bn: bool = False
    """Synchronise BatchNorm statistics across processes (with --nproc-per-node > 1)."""


class CalibrationStage(Strict):
    """`--stage calibration`: observers only, eval mode, from the float checkpoint."""

    num_batches: int = Field(16, gt=0)
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    """Activation range statistic: `minmax` (observed extremes), `percentile` (clip at the
    `percentile` of |x|, averaged over batches) or `mse` (clip where quantization MSE is lowest)."""
    percentile: float = Field(99.99, gt=0, le=100)
    """Percentile of |x| used by `observer = "percentile"` (0 < p <= 100)."""


class QatStage(TrainingStage):
    """`--stage qat`: fake-quant fine-tuning from the calibration checkpoint."""

    enabled: bool = True
    epochs: int = Field(1, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3, schedule="constant", weight_decay=0.0)
    activation_scales: Literal["frozen", "learned"] = "frozen"
    """Activation quantization scales during QAT: `frozen` keeps the calibrated ones (HAT's
    `averaging_constant = 0`); `learned` starts from them and trains them with the weights (LSQ,
    `hatcli.quant.lsq`: straight-through rounding, gradient scale 1/sqrt(features x qmax), zero
    point fixed at 0, no weight decay). The integer model uses the scales QAT ends with."""


Bits = Annotated[int, Field(ge=1, le=8)]
"""A low-bit width: 1 (binary) to 8."""


class LayerQuantRule(Strict):
    """One `[[quant.layers]]` entry: the layers whose module path matches `pattern` (fnmatch, as
    `hat check` prints paths) get this scheme and these bit widths; unset keys keep the `[quant]`
    values. The first matching entry wins, and it wins over `keep_first_last` and `real_skip`."""

    pattern: str = Field(min_length=1)
    scheme: str | None = None
    """A registered scheme (`hat plugins`), or `march` to keep these layers at the march's int8."""
    weight_bits: Bits | None = None
    activation_bits: Bits | None = None


class QuantConfig(Strict):
    """Quantization target and precision choices."""

    march: str = "nash_e"
    int16: list[str] = []
    """Module name patterns (fnmatch) whose outputs are computed in int16."""
    scheme: str = "march"
    """The QAT scheme of the convolution and linear layers: `march` (the march's int8 / int16
    rules, HAT's default) or a registered low-bit scheme: `lsq`, `pact`, `dorefa`, `xnor`,
    `xnorpp`, `lqnet` or a plugin's (`hat plugins` lists them; docs/quant_schemes.md)."""
    weight_bits: Bits = 8
    """Bits of the scheme's weights (1..8; each scheme says which it can train)."""
    activation_bits: Bits = 8
    """Bits of the scheme's layer inputs (1..8); the producers' own outputs stay on the march's grid."""
    weight_groups: int = Field(0, ge=0)
    """Weight scale granularity along the output channels: 0 one per channel, 1 one per tensor,
    G one per group of C / G consecutive channels (C must divide by G)."""
    keep_first_last: bool = True
    """Keep the first and the last weighted layer at the march's int8 (the usual practice)."""
    real_skip: bool = False
    """Keep shortcut (downsample) convolutions, modules matching `*downsample*` or `*shortcut*`,
    at the march's int8."""
    layers: list[LayerQuantRule] = []
    """Per-layer overrides, `[[quant.layers]]` tables (see `LayerQuantRule`)."""


class DeployConfig(Strict):
    """Export, compile and perf settings."""

    opt: int = Field(3, ge=0, le=3)
    perf_runs: int = Field(50, gt=0)


class Recipe(Strict):
    """A whole resolved recipe."""

    task: FolderName
    """Name of the run: outputs go to `<work_dir>/<task>/<stage>/` (one folder name)."""
    work_dir: str = "runs"
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where training and calibration run: `auto` is the GPU when there is one."""
    deterministic: bool = False
    """Deterministic kernels only (`torch.use_deterministic_algorithms`): a resumed run then ends
    with bitwise the same weights as an uninterrupted one."""
    data: DataConfig = DataConfig()
    model: dict[str, Any]
    float_: FloatStage = Field(FloatStage(), alias="float")
    calibration: CalibrationStage = CalibrationStage()
    qat: QatStage = QatStage()
    quant: QuantConfig = QuantConfig()
    deploy: DeployConfig = DeployConfig()
