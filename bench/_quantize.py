"""Shared by the deploy benchmarks: a float network -> hat's int8 QDQ ONNX -> compiled artifact.

The same path `hat export` and `hat compile` take, through the importable functions: the
deploy graph is prepared with the march's `MarchQuantizer`, calibrated on a few batches,
converted, exported to ONNX (QDQ, opset 21) and compiled at `--opt 3`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn


class PlainFamily:
    """The part of a model family `prepare_quantized` uses, for a network built outside any plugin."""

    name = "bench"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def build_deploy_model(self, float_model: nn.Module) -> nn.Module:
        """The network as it is."""
        return float_model

    def example_inputs(self, input_size: tuple[int, int], batch: int = 2) -> tuple[torch.Tensor]:
        """A random NCHW batch."""
        return (torch.randn(batch, 3, *input_size),)


def realistic_statistics(model: nn.Module, input_size: tuple[int, int], seed: int = 0) -> nn.Module:
    """Set every BatchNorm's running statistics from one random batch (momentum 1), so that
    activations keep unit scale through the randomly initialised network, as in a trained one
    (with plain random init they shrink layer by layer, towards values no real model computes).
    Returns the model in eval mode."""
    momenta = {m: m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for m in momenta:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, *input_size, generator=torch.Generator().manual_seed(seed)))
    for m, momentum in momenta.items():
        m.momentum = momentum
    return model.eval()


def quantized_onnx(model: nn.Module, input_size: tuple[int, int], march: str, path: Path,
                   calibration: list[torch.Tensor] | None = None, family: object | None = None) -> Path:
    """Quantize `model` for `march` with hat's flow and write its ONNX QDQ model to `path`.

    `calibration` batches (default: four random 2-image batches) set the activation ranges;
    `family` (default: a `PlainFamily`) supplies the deploy model and example inputs.
    """
    from hatcli.deploy.export import export_onnx
    from hatcli.quant.flow import convert_to_integer, export_program, prepare_quantized, set_mode
    from hatcli.quant.march import load_march

    family = family or PlainFamily(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared, _ = prepare_quantized(family, model.eval(), input_size, load_march(march), [])
        set_mode(prepared, "calibrate")
        gen = torch.Generator().manual_seed(0)
        batches = calibration or [torch.randn(2, 3, *input_size, generator=gen) for _ in range(4)]
        with torch.no_grad():
            for batch in batches:
                prepared(batch)
        integer = convert_to_integer(prepared)
        example = family.example_inputs(input_size, batch=2)
        program = export_program(integer, example)
    names = list(getattr(family, "output_names", ["output"]))
    export_onnx(program, example, path, names)
    return path


def float_onnx(model: nn.Module, input_size: tuple[int, int], path: Path) -> Path:
    """Export the float network (eval mode, batch 1) to ONNX with the dynamo exporter."""
    x = torch.randn(1, 3, *input_size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.export.export(model.eval(), (x,)), (x,), str(path), dynamo=True,
                          input_names=["image"], external_data=False)
    return path


def compiled(onnx_path: Path, march: str, out_dir: Path, input_size: tuple[int, int], opt: int = 3) -> Path:
    """Compile an ONNX model with `hat compile`'s function; return the artifact's model.onnx."""
    from hatcli.deploy.compile import compile_model
    from hatcli.quant.march import load_march

    spec = {"name": "image", "shape": [1, 3, *input_size], "dtype": "float32", "layout": "NCHW"}
    compile_model(onnx_path, load_march(march), opt, out_dir, spec, measure=False)
    return out_dir / "model.onnx"
