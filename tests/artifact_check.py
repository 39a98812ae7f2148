"""Compare the integer program (`int_infer`) with the compiled artifact of the same network: the
harness of the exactness grid and of the random-graph property tests."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import onnx
import torch
from torch import nn

from hatcli.deploy import compile as compile_module
from hatcli.deploy.compile import compile_model
from hatcli.deploy.export import export_onnx
from hatcli.deploy.runtime import load_artifact
from hatcli.quant.flow import convert_to_integer, export_program, prepare_quantized, set_mode
from hatcli.quant.integer import integer_program
from hatcli.quant.march import load_march
from tiny_nets import TinyFamily

WEIGHT_FORMATS = {"uint8": False, "int8": True}
"""Weight formats of the artifact: uint8 with zero point 128 (exact on every CPU) and int8 with
zero point 0 (ONNX Runtime's U8S8 kernels, exact where the CPU sums u8 x s8 in 32 bits)."""


class _Family(TinyFamily):
    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def build_float_model(self, config, num_classes):
        return self.net


@dataclass
class Disagreement:
    """Where the artifact compiled at `opt` with `weights` returned other values than int_infer."""

    opt: int
    weights: str
    output: int
    fraction: float
    """Share of output values that differ."""
    max_abs: float

    def __str__(self) -> str:
        return (f"opt {self.opt}, {self.weights} weights, output {self.output}: "
                f"{100 * self.fraction:.2f} % of values differ (max {self.max_abs:.3g})")


@dataclass
class Comparison:
    """The integer program's rewritten ops and every (opt, weight format) that disagreed with it."""

    integer_ops: list[str]
    disagreements: list[Disagreement]
    compiled_ops: dict[tuple[int, str], list[str]]
    """The op types of each compiled graph."""
    reference: torch.fx.GraphModule | None = None
    """The converted program the integer program was built from."""
    images: torch.Tensor | None = None
    """The inputs both programs ran on."""


def _images(size: tuple[int, int], count: int, seed: int) -> torch.Tensor:
    """Inputs that spread wide of the calibration data: the saturating clamps must agree too."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(count, 3, *size, generator=gen), 3 * torch.randn(count, 3, *size, generator=gen)])


def _as_tuple(output) -> tuple[torch.Tensor, ...]:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def compare_with_artifacts(net: nn.Module, march: str, size: tuple[int, int] = (8, 8), int16: tuple[str, ...] = (),
                           opts: tuple[int, ...] = (0, 1, 2, 3), weights: tuple[str, ...] = ("uint8", "int8"),
                           seed: int = 0, folder: Path | None = None, plan=None, schemes=None,
                           qat_steps: int = 0) -> Comparison:
    """Quantize `net` for `march` (int16 on the modules `int16` names), calibrate it on random
    data, build its integer program, export and compile it at every `opts` level in every weight
    format, and run both on the same wide-spread inputs. Returns what disagreed.

    `plan` / `schemes` give layers low-bit schemes (`hatcli.quant.low_bit`); `qat_steps` trains
    that many SGD steps of fake-quant training after calibration (learned scales move)."""
    torch.manual_seed(seed)
    profile = load_march(march)
    prepared, _ = prepare_quantized(_Family(net.eval()), net.eval(), size, profile, list(int16),
                                    plan=plan, schemes=schemes)
    set_mode(prepared, "calibrate")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn(8, 3, *size, generator=gen))
    if qat_steps:
        set_mode(prepared, "train")
        optimizer = torch.optim.SGD([p for p in prepared.parameters() if p.requires_grad], lr=0.01)
        for _ in range(qat_steps):
            outputs = _as_tuple(prepared(torch.randn(8, 3, *size, generator=gen)))
            loss = sum(o.float().square().mean() for o in outputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    set_mode(prepared, "eval")
    reference = convert_to_integer(prepared)
    integer = integer_program(reference)
    images = _images(size, 32, seed + 2)
    with torch.no_grad():
        ours = _as_tuple(integer(images))
    with tempfile.TemporaryDirectory() if folder is None else _keep(folder) as where:
        where = Path(where)
        example = (torch.randn(2, 3, *size),)
        names = [f"out{i}" for i in range(len(ours))]
        export_onnx(export_program(reference, example), example, where / "model.onnx", names)
        disagreements, compiled_ops = [], {}
        for weight_format in weights:
            with mock.patch.object(compile_module, "exact_u8s8", lambda signed=WEIGHT_FORMATS[weight_format]: signed):
                for opt in opts:
                    out = compile_model(where / "model.onnx", profile, opt, where / f"{weight_format}-O{opt}",
                                        {"shape": ["N", 3, *size]}, measure=False)
                    artifact = load_artifact(out)
                    compiled_ops[(opt, weight_format)] = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
                    theirs = [torch.from_numpy(t) for t in artifact.run(images.numpy())]
                    for index, (a, b) in enumerate(zip(ours, theirs)):
                        if a.shape != b.shape or not torch.equal(a, b):
                            differ = (a != b) if a.shape == b.shape else torch.ones(1, dtype=torch.bool)
                            gap = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
                            disagreements.append(Disagreement(opt, weight_format, index,
                                                              differ.float().mean().item(), gap))
    return Comparison(list(integer.integer_ops), disagreements, compiled_ops, reference, images)


class _keep:
    """A context manager standing for a folder the caller keeps (no clean-up)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder

    def __exit__(self, *exc) -> None:
        return None
