"""UNet: the network's shapes for several configurations, the recipe schema's refusals, and the
network quantized, in integers and compiled on nash_e, where the artifact equals int_infer."""

from __future__ import annotations

import collections

import pytest
import torch
from pydantic import ValidationError

from hat_unet.family import UNetConfig, UNetFamily
from hat_unet.model import UNet
from hatcli.deploy.compile import compile_model
from hatcli.deploy.export import export_onnx
from hatcli.deploy.runtime import load_artifact
from hatcli.quant.flow import convert_to_integer, export_program, prepare_quantized, set_mode
from hatcli.quant.integer import integer_program
from hatcli.quant.march import load_march

FAMILY = UNetFamily()
NUM_CLASSES = 7


def config(**table) -> UNetConfig:
    """Validate a `[model]` table of `unet` with these keys (no input size known)."""
    return UNetConfig.model_validate({"name": "unet", **table})


def config_for(size: tuple[int, int], **table) -> UNetConfig:
    """Validate a `[model]` table as a recipe with `data.input_size = size` does."""
    return UNetConfig.model_validate({"name": "unet", **table}, context={"input_size": size})


@pytest.mark.parametrize("table, size, out_size", [
    ({}, (64, 64), (64, 64)),
    ({"base_channels": 8, "depth": 2, "dilation": 1}, (32, 48), (32, 48)),
    ({"upsample": "bilinear", "depth": 4}, (128, 64), (128, 64)),
    ({"output_stride": 2}, (32, 32), (16, 16)),
    ({"output_stride": 4, "depth": 2, "base_channels": 4}, (64, 64), (16, 16)),
])
def test_the_logits_have_a_class_axis_and_the_input_size_over_the_output_stride(table, size, out_size):
    cfg = config_for(size, **table)
    net = FAMILY.build_float_model(cfg, NUM_CLASSES).eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 3, *size))
    assert logits.shape == (2, NUM_CLASSES, *out_size)
    maps = FAMILY.predict(logits, config=cfg)
    assert len(maps) == 2 and all(m.labels.shape == size for m in maps)
    described = FAMILY.describe_outputs(cfg, size, NUM_CLASSES)
    assert described[0]["shape"] == ["N", NUM_CLASSES, *out_size] and described[0]["stride"] == cfg.output_stride


def test_each_level_doubles_the_width_and_the_context_block_is_dilated():
    net = UNet(NUM_CLASSES, base_channels=16, depth=3, dilation=2)
    assert net.widths == [16, 32, 64, 128]
    assert net.context.conv.dilation == (2, 2)
    assert len(net.up) == 3 and net.classifier.in_channels == 16
    assert isinstance(UNet(NUM_CLASSES, dilation=1).context, torch.nn.Identity)


def test_the_shared_family_object_keeps_its_output_stride():
    FAMILY.predict(torch.zeros(1, NUM_CLASSES, 8, 8), config=config(output_stride=4))
    assert FAMILY.output_stride == 1
    assert FAMILY.predict(torch.zeros(1, NUM_CLASSES, 8, 8), config=config(output_stride=4))[0].labels.shape == (32, 32)


@pytest.mark.parametrize("table, size, message", [
    ({"upsample": "bicubic"}, None, "upsample"),
    ({"depth": 5}, (32, 32), "too deep for a 32x32 input"),
    ({"depth": 3}, (36, 36), "divisible by 8"),
    ({"dilation": 4}, (32, 32), "dilation 4 reaches past a 4-pixel bottleneck"),
    ({"output_stride": 8, "depth": 2}, None, "coarser than the bottleneck"),
    ({"output_stride": 3}, None, "output_stride"),
    ({"widht": 3}, None, "widht"),
])
def test_bad_model_tables_are_refused_with_the_reason(table, size, message):
    with pytest.raises(ValidationError, match=message):
        config_for(size, **table) if size else config(**table)


def test_the_minimum_input_takes_the_tiny_and_the_default_configs():
    for cfg in (FAMILY.tiny_config(), config()):
        config_for(FAMILY.min_input_size, **cfg.model_dump(exclude={"name"}, exclude_none=True))


SIZE = (32, 32)


def quantize_and_compile(upsample: str, folder):
    """(quantizer, integer program, artifact) of a tiny UNet with `upsample`, on nash_e."""
    torch.manual_seed(0)
    cfg = config(base_channels=8, depth=2, upsample=upsample)
    model = FAMILY.build_float_model(cfg, NUM_CLASSES).eval()
    march = load_march("nash_e")
    prepared, quantizer = prepare_quantized(FAMILY, model, SIZE, march, FAMILY.int16_outputs(cfg))
    set_mode(prepared, "calibrate")
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn(4, 3, *SIZE))
    reference = convert_to_integer(prepared)
    example = FAMILY.example_inputs(SIZE, batch=2)
    export_onnx(export_program(reference, example), example, folder / "model.onnx", FAMILY.output_names)
    compile_model(folder / "model.onnx", march, 3, folder / "compiled", {"shape": ["N", 3, *SIZE]}, measure=False)
    return quantizer, integer_program(reference), load_artifact(folder / "compiled")


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_int_infer_equals_the_compiled_artifact_exactly(upsample, tmp_path):
    quantizer, integer, artifact = quantize_and_compile(upsample, tmp_path)
    assert quantizer.unquantized == []
    kinds = collections.Counter(op.split()[0] for op in integer.integer_ops)
    assert kinds["conv2d"] == 2 + 2 * 2 + 1 + 2 * 2 + 1 and kinds["add"] == 1  # stem, down, context, up, classifier
    if upsample == "bilinear":
        assert kinds["resample"] == 2
    images = 1.5 * torch.randn(4, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = integer(images)
    theirs = torch.from_numpy(artifact.run(images.numpy())[0])
    assert ours.shape == theirs.shape == (4, NUM_CLASSES, *SIZE)
    assert torch.equal(ours, theirs)
