"""The march profile schema: what a target accelerator can run, and how fast, as data.

A profile is a TOML file (hat's own are in `hatcli/quant/marches/`; a plugin ships its own through
the `register_marches` hook, and `hat perf --fit` writes one from a user's board measurements).
Nothing in hat branches on a march name: the quantizer, `hat check` and the latency model read the
profile's fields. This module sits below the plugin manager, so plugins.py can check what a plugin
registers; `hatcli.quant.march` looks profiles up by name.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from hatcli.errors import UsageError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantRules(_Strict):
    """Quantization constraints of a march."""

    activation_dtypes: list[Literal["int8", "int16"]] = ["int8"]
    """Activation dtypes the march computes with (per-tensor, zero point 0)."""
    weight_dtype: Literal["int8"] = "int8"
    """Weights are always symmetric, per output channel."""
    float_output: bool = True
    """Whether the last layer may produce a dequantized (float / int32-accumulator) output."""
    unsigned_after_relu: bool = True
    """Non-negative (post-ReLU) tensors use the unsigned 8-bit grid, zero point still 0."""
    accumulator_bits: int = Field(32, ge=24, le=64)
    """Width of the conv / matmul accumulator, which saturates (never wraps) at its ends. Horizon
    does not publish what its BPUs do past 32 bits; we model a saturating 32-bit accumulator.
    An 8-bit layer cannot reach it (the int32 bias range leaves room, `hatcli.quant.bias_range`);
    an int16 layer with a large fan-in can, and conversion reports it."""

    @property
    def allow_int16(self) -> bool:
        """Whether int16 activations may be requested on this march."""
        return "int16" in self.activation_dtypes


class OpRule(_Strict):
    """Limits of one operator type on a march (ONNX op names)."""

    max_kernel: int | None = None
    max_stride: int | None = None
    group_channel_multiple: int | None = None
    """Grouped (non-depthwise) convolutions need channels-per-group a multiple of this."""
    spatial_mean_only: bool = False
    """The op (ReduceMean) runs as an integer kernel only as a mean over H and W that keeps the
    dimensions (global average pooling, N x C x 1 x 1 out)."""
    note: str = ""


FITTED_FEATURES: tuple[str, ...] = (
    "frame", "dense_gmac", "depthwise_gmac", "grouped_gmac", "matmul_gmac", "activation_mb", "weight_mb",
    "elementwise_melem", "table_melem", "resize_melem", "block", "cpu_melem", "cpu_block",
)
"""The features of the fitted latency model (hatcli/deploy/perf_features.py says what each counts)."""


def _known_features(values: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(values) - set(FITTED_FEATURES))
    if unknown:
        raise ValueError(f"unknown feature(s) {', '.join(unknown)}; the features are {', '.join(FITTED_FEATURES)}")
    return values


class FitError(_Strict):
    """How far off the fitted model was on measured models it was not fitted to. `rows = 0`: the
    model was never checked on this chip (e.g. another chip's fit, scaled; `data` says how), and
    the error figures are absent."""

    method: str = "leave one model family out"
    rows: int = Field(ge=0)
    """Measured models the error is taken over."""
    families: int = Field(0, ge=0)
    median_abs_error: float | None = Field(None, ge=0)
    """Median of |estimate / measured - 1|."""
    within_10: float | None = Field(None, ge=0, le=1)
    """Share of models within +-10 %."""
    within_25: float | None = Field(None, ge=0, le=1)
    spearman: float | None = None
    """Rank correlation of estimated against measured."""
    data: str = ""
    """What was measured: board, tool, which rows (or, with `rows = 0`, where the fit comes from)."""

    @model_validator(mode="after")
    def _figures_only_with_rows(self) -> FitError:
        figures = (self.median_abs_error, self.within_10, self.within_25)
        if self.rows and any(f is None for f in figures):
            raise ValueError("median_abs_error, within_10 and within_25 are required when rows > 0")
        if not self.rows and any(f is not None for f in (*figures, self.spearman)):
            raise ValueError("rows = 0 (never checked on this chip) takes no error figures")
        return self


class FittedCost(_Strict):
    """A latency model fitted to measured latencies of whole models (docs/perf_model.md):
    `ms = sum(latency_ms[f] * feature[f])`, the features counted per fused block."""

    channel_alignment: int = Field(1, ge=1, le=256)
    """Output channels are rounded up to a multiple of this before MACs are counted."""
    input_alignment: int = Field(1, ge=1, le=256)
    """Input channels (per group) are rounded up to a multiple of this."""
    latency_ms: Annotated[dict[str, float], AfterValidator(_known_features)]
    """Milliseconds per unit of each feature, single-frame latency (one thread)."""
    frame_ms_under_load: Annotated[dict[str, float], AfterValidator(_known_features)] = {}
    """Milliseconds per frame per unit of each feature with several threads feeding the
    accelerator (1000 / FPS); empty: FPS is 1000 / latency."""
    load_threads: int | None = None
    """The thread count `frame_ms_under_load` was measured at (the most common in the data)."""
    error: FitError
    throughput_error: FitError | None = None
    support: Annotated[dict[str, float], AfterValidator(_known_features)] = {}
    """The most of each feature (per frame) any fitted model had: beyond it, an estimate is an
    extrapolation and says so."""
    bpu_ops: list[str] = []
    """The op types (ONNX, after fusion) the fitted models ran on the accelerator; a model with
    another op is an extrapolation. Empty: not recorded (no check)."""
    cpu_ops: list[str] = []
    """The op types that fell back to the CPU in the fitted models; a model with another CPU
    fallback op is an extrapolation."""


class CostModel(_Strict):
    """Numbers behind the latency estimate (see docs/perf_model.md)."""

    utilisation: float = Field(0.5, gt=0, le=1)
    """Fraction of peak int8 throughput a dense conv reaches."""
    depthwise_utilisation: float = Field(0.1, gt=0, le=1)
    """Fraction of peak reached by depthwise / small-channel convs."""
    ddr_gbytes_per_s: float = Field(gt=0)
    """Sustained DRAM bandwidth in GB/s."""
    per_layer_overhead_us: float = 0.0
    """Fixed cost per layer (dispatch, synchronisation)."""
    narrow_input_utilisation: float | None = Field(None, gt=0, le=1)
    """Fraction of peak reached by a conv whose input channels per group are not a multiple of
    4 (the stem on an RGB image); None: `utilisation`."""
    narrow_input_ns_per_element: float = Field(0.0, ge=0)
    """Extra time per output element of a narrow-input conv (its im2col and requantization)."""
    output_conv_utilisation: float | None = Field(None, gt=0, le=1)
    """Fraction of peak reached by a conv / matmul whose int32 accumulator is a graph output;
    None: `utilisation`."""
    elementwise_ns_per_element: float = Field(0.0, ge=0)
    """Compute time per output element of a layer without MACs (add, mul, pooling, resize...),
    on top of its memory traffic; 0: those layers are memory-bound."""
    table_ns_per_element: float = Field(0.0, ge=0)
    """Compute time per output element of a look-up-table activation (sigmoid, tanh, hard-swish,
    exp) the march cannot fuse into the layer before it; 0: fused or memory-bound."""
    fitted: FittedCost | None = None
    """A model fitted to measured whole-model latencies; when present it gives the estimate and
    the fields above only serve marches without one."""


class MarchProfile(_Strict):
    """One target: public throughput, quantization rules, op support and a cost model."""

    name: str
    chip: str
    description: str = ""
    int8_tops: float = Field(gt=0)
    """Public peak int8 TOPS (tera-operations per second, 1 MAC = 2 ops)."""
    estimated: bool = True
    """True for accelerators we cannot run here: their latency is an estimate."""
    quant: QuantRules = QuantRules()
    ops: dict[str, OpRule] = {}
    """Supported ONNX op types (after Q/DQ folding) and their limits."""
    fusible_activations: list[str] = [
        "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
        "SiLU", "BatchNormalization"]
    """Activations applied on a conv/matmul/add result before requantization (no int8 tensor
    between them). Others must be quantized on their own, or they run in float on the CPU."""
    cost: CostModel
    sources: list[str] = []
    """Where the public figures come from."""


class _Readable(Protocol):
    def read_text(self, encoding: str = ...) -> str: ...


def read_march_file(path: Path | _Readable, what: str | None = None) -> MarchProfile:
    """Read and validate the march profile TOML at `path` (a file, or a package resource).

    Raises UsageError naming the file and the first invalid key, so that a hand-edited or fitted
    profile gets a one-line error; `what` names the file in that message (default: `path`).
    """
    where = what or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{where}: cannot read the march profile: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where}: not valid TOML: {exc}") from None
    try:
        return MarchProfile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise UsageError(f"{where}: march profile key `{key}`: {first['msg']}") from None


def march_toml(profile: MarchProfile, header: str = "") -> str:
    """The TOML text of `profile` (None fields left out), under `header` comment lines."""
    import tomli_w

    data = profile.model_dump(mode="json", exclude_none=True)
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + tomli_w.dumps(data)


def write_march_file(profile: MarchProfile, path: Path, header: str = "") -> None:
    """Write `profile` to `path` as TOML, atomically; it reads back with `read_march_file`."""
    from hatcli.atomic import atomic_write_text

    atomic_write_text(path, march_toml(profile, header))
