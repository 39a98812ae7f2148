"""MobileNetV2: torchvision's parameter counts, state-dict keys and outputs, the width rounding,
the recipe schema, output shapes, and quantization through hat's PT2E flow."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torchvision
from pydantic import ValidationError
from torch import nn

from hat_mobilenet.family import MobileNetV2Config, MobileNetV2Family
from hat_mobilenet.mobilenet_v2 import STRIDES, InvertedResidual, make_divisible
from hatcli.quant.flow import convert_to_integer, export_deploy_graph, prepare_quantized, set_mode
from hatcli.quant.integer import integer_program
from hatcli.quant.march import load_march

FAMILY = MobileNetV2Family()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is much faster (no intra-op sync; tests/conftest.py's fixture of
    the same name is not visible under plugins/)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**table) -> MobileNetV2Config:
    """Validate a `[model]` table of `mobilenet_v2` with these keys."""
    return MobileNetV2Config.model_validate({"name": "mobilenet_v2", **table})


def build(num_classes: int = 10, **table) -> nn.Module:
    """The family's float model for this `[model]` table, seeded."""
    torch.manual_seed(0)
    return FAMILY.build_float_model(config(**table), num_classes)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- torchvision's network -----------------------------------------------------------------------
def test_alpha_1_is_torchvisions_mobilenet_v2():
    ours = build(1000).eval()
    theirs = torchvision.models.mobilenet_v2(weights=None).eval()
    assert params(ours) == params(theirs) == 3_504_872
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert [(k, v.shape) for k, v in ours_state.items()] == [(k, v.shape) for k, v in theirs_state.items()]
    ours.load_state_dict(theirs_state)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("alpha", [0.5, 1.4])
def test_width_multiplier_matches_torchvisions_width_mult(alpha):
    assert params(build(1000, alpha=alpha)) == params(torchvision.models.mobilenet_v2(width_mult=alpha))


def test_channels_round_to_multiples_of_8_and_last_channels_grow_only_above_1():
    assert [make_divisible(c * 0.25) for c in (32, 16, 24, 32, 64, 96, 160, 320)] == [8, 8, 8, 8, 16, 24, 40, 80]
    assert make_divisible(1280 * 1.4) == 1792
    assert build(alpha=0.25).classifier[1].in_features == 1280
    assert build(alpha=1.4).classifier[1].in_features == 1792


def test_module_names_are_torchvisions_and_activations_are_relu6_modules():
    net = build(1000)
    modules = dict(net.named_modules())
    assert isinstance(modules["features.0.0"], nn.Conv2d) and modules["features.0.0"].stride == (2, 2)
    assert isinstance(modules["classifier.1"], nn.Linear) and modules["classifier.0"].p == 0.2
    assert isinstance(modules["features.18.2"], nn.ReLU6)
    blocks = [m for m in net.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == len(STRIDES) == 17
    assert [b.use_res_connect for b in blocks].count(True) == 10
    relu6 = [m for m in net.modules() if isinstance(m, nn.ReLU6)]
    assert len(relu6) == 2 + 2 * 17 - 1 and not any(m.inplace for m in relu6)  # block 1 has no expansion
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())


def test_init_is_torchvisions():
    net = build(1000)
    stem = net.features[0][0].weight.detach()
    assert abs(float(stem.std()) - (2 / (32 * 9)) ** 0.5) < 0.01  # He-normal, fan-out
    assert float(net.classifier[1].weight.detach().std()) == pytest.approx(0.01, rel=0.05)
    assert not net.classifier[1].bias.any()
    bn = net.features[1].conv[2]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()


# -- shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("side, table", [(32, {"stem_stride": 1}), (64, {})])
def test_logits_shape(side, table):
    net = build(7, alpha=0.25, **table).eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 3, side, side))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


def test_stem_and_block_strides_set_the_output_stride():
    strides = [1] * 17
    net = build(alpha=0.25, stem_stride=1, block_strides=strides).eval()
    with torch.no_grad():
        assert net.features(torch.randn(1, 3, 16, 16)).shape[-2:] == (16, 16)
        assert build(alpha=0.25).eval().features(torch.randn(1, 3, 64, 64)).shape[-2:] == (2, 2)


# -- recipe schema -------------------------------------------------------------------------------
def test_defaults():
    cfg = config()
    assert (cfg.alpha, cfg.stem_stride, cfg.block_strides, cfg.dropout, cfg.num_classes) == (1.0, 2, None, 0.2, None)
    assert list(STRIDES) == [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert isinstance(build(dropout=0).classifier[0], nn.Identity)


@pytest.mark.parametrize("table, message", [
    ({"block_strides": [1, 2]}, "block_strides needs 17 values"),
    ({"block_strides": [1] * 16 + [3]}, "each 1 or 2"),
    ({"block_strides": [1] * 18}, "block_strides needs 17 values"),
    ({"stem_stride": 3}, "stem_stride"),
    ({"alpha": 0}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
    ({"alpah": 0.5}, "alpah"),
])
def test_bad_model_tables_are_refused_with_the_reason(table, message):
    with pytest.raises(ValidationError, match=message):
        config(**table)


def test_tiny_config():
    cfg = FAMILY.tiny_config()
    assert cfg.alpha == 0.25 and FAMILY.min_input_size == (32, 32)


# -- quantization --------------------------------------------------------------------------------
def test_dropout_acts_in_training_and_is_absent_from_the_exported_graph():
    """An eval-mode `aten.dropout` before the Linear would requantize the pooled features onto a
    grid of their own (and the compiled artifact then rounded its ties otherwise than int_infer)."""
    net = build(alpha=0.25).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = export_deploy_graph(FAMILY, net, (32, 32))
    assert not any("dropout" in str(n.target) for n in graph.graph.nodes)
    assert any("linear" in str(n.target) for n in graph.graph.nodes)


def test_calibrates_and_converts_to_the_integer_program():
    net = build(alpha=0.25, stem_stride=1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared, quantizer = prepare_quantized(FAMILY, net, (32, 32), load_march("nash_e"), [])
        set_mode(prepared, "calibrate")
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(2):
                prepared(torch.randn(4, 3, 32, 32, generator=gen))
        integer = integer_program(convert_to_integer(prepared))
    assert quantizer.unquantized == []
    kinds = collections.Counter(op.split()[0] for op in integer.integer_ops)
    convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    residuals = sum(b.use_res_connect for b in net.modules() if isinstance(b, InvertedResidual))
    assert kinds == {"quantize": 1, "conv2d": convs, "add": residuals, "global_avg_pool": 1, "linear": 1}
    with torch.no_grad():
        logits = integer(torch.randn(3, 3, 32, 32, generator=gen))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
