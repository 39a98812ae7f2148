"""What a model family and a dataset packer provide: the objects plugins register.

Behaviour that belongs to a family lives on its family object (rule 1 of ARCHITECTURE.md):
building the float model from its recipe table, the deploy model without loss or
post-processing, example inputs, its task kind, its loss, decoding and drawing predictions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # torch is imported lazily so that `hat --help` stays fast
    import torch
    from PIL import Image

TaskKind = Literal["classification", "detection", "segmentation"]


class FamilyConfig(BaseModel):
    """Base of every family's `[model]` table schema; unknown keys are errors.

    A recipe's table is validated with the pydantic validation context `{"input_size": (H, W)}`
    (the recipe's `data.input_size`), so a validator that needs the input size (an arch of a fixed
    input size) reads `info.context`; it is None where a table is validated on its own.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    """The registered family name, e.g. `mobilenet_v1` (every `[model]` table has it)."""

    num_classes: int | None = Field(None, ge=1)
    """Optional: the number of classes the recipe expects. The model is always built with the packed
    training data's class count; when this is set, training refuses data with another count."""

    weights: str | None = Field(None, min_length=1)
    """Optional: a weights file the float stage starts from (a PyTorch state dict `.pt` / `.pth`, a
    checkpoint holding one under `state_dict` / `model`, a `.safetensors` file, or a hat float
    checkpoint), relative to the recipe file that sets it (to the working directory with `--set`);
    with `float.epochs = 0` the float stage is these weights, evaluated. hat only reads it."""


class ModelFamily(ABC):
    """A model family registered by a plugin under a plain name."""

    name: ClassVar[str]
    """Registry key used in recipes as `[model] name = ...`."""

    task: ClassVar[TaskKind]
    """Which task (and so which loss, metric and packed data) the family serves."""

    config_class: ClassVar[type[FamilyConfig]] = FamilyConfig
    """Schema that validates the recipe's `[model]` table."""

    description: ClassVar[str] = ""
    """One line that says what the family is (shown with the family's name)."""

    output_names: ClassVar[list[str]] = ["output"]
    """Names of the deploy model's outputs, in order: the ONNX output names and the artifact's
    `outputs`. A deploy model with several outputs returns a flat tuple in this order."""

    min_input_size: ClassVar[tuple[int, int]] = (32, 32)
    """The smallest input (H, W) the family's networks take; the tests parametrized over every
    registered family run it at this size."""

    def tiny_config(self) -> FamilyConfig:
        """A small configuration of the family that builds and exports in seconds, for the tests
        that run every registered family (default: the schema's defaults)."""
        return self.config_class(name=self.name)

    @abstractmethod
    def build_float_model(self, config: FamilyConfig, num_classes: int) -> torch.nn.Module:
        """Return the float (trainable) network; its forward returns raw outputs, never a loss."""

    def build_deploy_model(self, float_model: torch.nn.Module) -> torch.nn.Module:
        """Return the network that is quantized and deployed: no loss, no post-processing."""
        return float_model

    def example_inputs(self, input_size: tuple[int, int], batch: int = 2) -> tuple[Any, ...]:
        """Return example inputs (NCHW float) used to export the deploy model."""
        import torch

        return (torch.randn(batch, 3, *input_size),)

    @abstractmethod
    def loss(self, outputs: Any, targets: Any, label_smoothing: float = 0.0,
             config: FamilyConfig | None = None) -> torch.Tensor:
        """Return the training loss for one batch of raw outputs and targets.

        `config` is the recipe's `[model]` table (None: the family's defaults); the trainer
        passes it, so losses that depend on model settings need no state of their own.
        """

    @abstractmethod
    def predict(self, outputs: Any, topk: int = 5, config: FamilyConfig | None = None) -> list[Any]:
        """Decode raw outputs of a batch into per-image predictions (at most `topk` each)."""

    @abstractmethod
    def build_metric(self, dataset: Any, config: FamilyConfig | None = None) -> Any:
        """Return the metric that scores this family on packed `dataset`.

        The object has `update(outputs, targets)` (one batch of raw outputs and the loader's
        targets), `merge_across_ranks()` and `compute() -> {name: percent}`; the task's primary
        metric (`top1`, `mAP`) is among the names.
        """

    @abstractmethod
    def draw_predictions(self, image: Image.Image, prediction: Any, class_names: list[str]) -> Image.Image:
        """Return a copy of `image` with one image's `prediction` drawn on it."""

    def int16_outputs(self, config: FamilyConfig) -> list[str]:
        """Name patterns of modules whose outputs the family wants in int16 (default none)."""
        return []

    def describe_outputs(self, config: FamilyConfig, input_size: tuple[int, int],
                         num_classes: int) -> list[dict[str, Any]]:
        """What each deploy-model output is, in `output_names` order, for a consumer without hat.

        The export writes this list into the manifest as `output_meaning` (docs/formats.md), for
        the recipe's `[model]` table `config`, its input (H, W) and the trained class count. An
        entry has `name` and `what`, plus whatever a consumer needs to read the values: `shape`
        (`"N"` for the batch; the exported shape is recorded when an entry has none, and a shape
        that differs from the exported one is an error), `layout`, `decode`. Default: a generic
        entry per output that points at the family's own decoding.
        """
        return [{"name": name, "what": "raw output",
                 "decode": f"decoded on the host by the `{self.name}` family (its `predict`); see its documentation"}
                for name in self.output_names]


@dataclass(frozen=True)
class PackRequest:
    """Everything `hat pack KIND` passes to a packer."""

    kind: str
    target_data_dir: Path
    src_data_dir: Path | None = None
    split: str = "all"
    task: TaskKind = "classification"
    num_images: int | None = None
    image_size: int = 64
    seed: int = 0
    workers: int = -1
    """Read/validate processes; -1: automatic (one per core, up to 8, on large sources)."""
    strict: bool = False
    ann_file: Path | None = None
    max_bytes: int = 64 << 20
    """Source files larger than this are rejected from their size, before they are read."""
    max_pixels: int = 89_478_485
    """Images with more pixels are rejected from their header, before they are decoded (PIL's limit)."""
    follow_symlinks: bool = False
    """Whether to read files (and class folders) that symlinks place outside the source folder."""


@dataclass
class PackResult:
    """What a packer wrote: one entry per database, with its record count and rejects."""

    databases: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Problems that did not stop the pack (an empty class folder); errors under `strict`."""


@dataclass(frozen=True)
class Packer:
    """A dataset packer registered under a plain name (`hat pack NAME`)."""

    name: str
    description: str
    run: Callable[[PackRequest], PackResult]


@dataclass(frozen=True)
class CallbackSpec:
    """A training callback registered under a plain name (recipes: ``callbacks = [{name = ...}]``).

    `factory(**args)` returns an object with any of the `hatcli.engine.callbacks.Callback`
    methods; the recipe table's other keys are its arguments.
    """

    name: str
    description: str
    factory: Callable[..., Any]


@dataclass(frozen=True)
class QuantSchemeSpec:
    """A quantization-aware-training scheme registered under a plain name (recipes:
    ``[quant] scheme = "NAME"``); `docs/quant_schemes.md` says how to write one.

    `factory()` returns the scheme object (`hatcli.quant.low_bit.scheme.Scheme`), imported lazily
    so that registering a scheme costs no torch import. `weight_bits` / `activation_bits` are the
    inclusive bit-width ranges the scheme can train; a recipe asking for others is refused at load.
    `integer` is False for schemes whose levels are not a uniform grid (LQ-Net): they train and
    evaluate in fake quantization only, and `why_not_integer` says why they cannot be deployed.
    """

    name: str
    description: str
    factory: Callable[[], Any]
    weight_bits: tuple[int, int] = (2, 8)
    activation_bits: tuple[int, int] = (2, 8)
    integer: bool = True
    why_not_integer: str = ""

