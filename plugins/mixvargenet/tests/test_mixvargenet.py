"""MixVarGENet: blocks, the ImageNet layout, its MAC count, the recipe schema, and quantization."""

from __future__ import annotations

import collections

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from hat_mixvargenet.blocks import BLOCKS, BasicMixVarGEBlock
from hat_mixvargenet.family import MixVarGENetConfig, MixVarGENetFamily
from hat_mixvargenet.model import IMAGENET_STAGES, MixVarGENet, StageSpec, output_strides, stride2channels
from hatcli.deploy.calops import count_ops
from hatcli.quant.flow import convert_to_integer, prepare_quantized, set_mode
from hatcli.quant.integer import integer_program
from hatcli.quant.march import load_march

# every block kind, a strided shortcut, downsample layers and two fusions (ratio 2 and 4), small
TINY = (
    StageSpec(16, "mixvarge_f2", (), 1, extra_downsample_num=2),
    StageSpec(32, "mixvarge_f4", ("mixvarge_f4",), 2, fusion_strides=(1,)),
    StageSpec(32, "mixvarge_f2_gb16", ("mixvarge_f2_gb16",), 2, fusion_strides=(1,)),
)


def tiny_net() -> MixVarGENet:
    """`TINY` at 16x16 with 5 classes, seeded."""
    torch.manual_seed(0)
    return MixVarGENet(num_classes=5, stages=TINY, stem_channels=16, stem_stride=1, fc_channels=64)


def config(**table) -> MixVarGENetConfig:
    """Validate a `[model]` table of `mixvargenet` with these keys."""
    return MixVarGENetConfig.model_validate({"name": "mixvargenet", **table})


# -- blocks --------------------------------------------------------------------------------------
def test_grouped_block_expands_strides_and_groups_sixteen_channels():
    block = BasicMixVarGEBlock(32, 48, 2, BLOCKS["mixvarge_f2_gb16"])
    conv1, conv2 = block.conv1[0], block.conv2[0]
    assert (conv1.in_channels, conv1.out_channels, conv1.groups, conv1.stride, conv1.kernel_size) == (
        32, 64, 2, (2, 2), (3, 3))
    assert conv1.weight.shape[1] == 16  # input channels per group
    assert (conv2.in_channels, conv2.out_channels, conv2.groups, conv2.kernel_size) == (64, 48, 1, (1, 1))
    assert block(torch.randn(1, 32, 16, 16)).shape == (1, 48, 8, 8)


@pytest.mark.parametrize("name, factor", [("mixvarge_f2", 2), ("mixvarge_f4", 4)])
def test_dense_blocks_expand_by_their_factor(name, factor):
    block = BasicMixVarGEBlock(16, 16, 1, BLOCKS[name])
    assert block.conv1[0].out_channels == 16 * factor and block.conv1[0].groups == 1


def test_shortcut_is_the_identity_when_the_shape_is_kept():
    block = BasicMixVarGEBlock(16, 16, 1, BLOCKS["mixvarge_f4"]).eval()
    x = torch.randn(2, 16, 8, 8)
    assert block.downsample is None
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(block.conv2(block.conv1(x)) + x))


@pytest.mark.parametrize("cin, cout, stride", [(16, 32, 1), (16, 16, 2), (16, 32, 2)])
def test_shortcut_is_a_strided_1x1_conv_when_the_shape_changes(cin, cout, stride):
    block = BasicMixVarGEBlock(cin, cout, stride, BLOCKS["mixvarge_f2"])
    conv, bn = block.downsample
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (cin, cout, (1, 1), (stride,) * 2)
    assert isinstance(bn, nn.BatchNorm2d)
    assert block(torch.randn(1, cin, 8, 8)).shape == (1, cout, 8 // stride, 8 // stride)


def test_grouped_block_needs_whole_groups_of_sixteen():
    with pytest.raises(ValueError, match="multiple of 16, got 24"):
        BasicMixVarGEBlock(24, 24, 1, BLOCKS["mixvarge_f2_gb16"])


# -- the network ---------------------------------------------------------------------------------
def test_imagenet_layout_is_hats_five_stages():
    ops = [[s.head_op, *s.stack_ops] for s in IMAGENET_STAGES]
    assert ops == [
        ["mixvarge_f2"],
        ["mixvarge_f4"] * 3,
        ["mixvarge_f4"] * 3,
        ["mixvarge_f2_gb16"] * 7,
        ["mixvarge_f2_gb16"] * 3,
    ]
    assert output_strides(IMAGENET_STAGES, 2) == [2, 4, 8, 16, 32]
    assert stride2channels(IMAGENET_STAGES) == {2: 32, 4: 32, 8: 64, 16: 96, 32: 160}
    net = MixVarGENet(num_classes=10)
    assert [1 + len(stage.stack) for stage in net.stages] == [len(o) for o in ops]
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def expected_macs(stages, stem_channels: int, stem_stride: int, fc_channels: int, classes: int, size: int) -> int:
    """Multiply-accumulates of every conv and the classifier, from the layout alone."""
    def conv(cin, cout, k, groups, side):
        return side * side * cout * (cin // groups) * k * k

    side = size // stem_stride
    total, cin = conv(3, stem_channels, 3, 1, side), stem_channels
    for stage in stages:
        for k, op in enumerate((stage.head_op, *stage.stack_ops)):
            stride = stage.stride if k == 0 else 1
            spec, cout = BLOCKS[op], stage.out_channels
            side_out = side // stride
            groups = cin // spec.group_base if spec.group_base else 1
            total += conv(cin, cin * spec.factor, 3, groups, side_out) + conv(cin * spec.factor, cout, 1, 1, side_out)
            if stride != 1 or cin != cout:
                total += conv(cin, cout, 1, 1, side_out)
            side, cin = side_out, cout
    return total + conv(cin, fc_channels, 1, 1, side) + fc_channels * classes


def test_mac_count_at_224_follows_from_the_layout():
    net = MixVarGENet(num_classes=1000)
    report = count_ops(net, torch.zeros(1, 3, 224, 224))
    assert report.macs == expected_macs(IMAGENET_STAGES, 32, 2, 1024, 1000, 224)
    # the figures in hat_mixvargenet/model.py's docstring
    assert round(report.macs / 1e9, 3) == 1.034 and round(report.params / 1e6, 2) == 2.30


# -- fusion --------------------------------------------------------------------------------------
def test_fusion_adds_the_downsampled_earlier_features_into_the_head_block():
    net = tiny_net().eval()
    assert net.fusion_sources == [[], [(0, 0)], [(0, 1)]]
    assert [len(s.downsample_layers) for s in net.stages] == [2, 0, 0]
    assert net.stages[2].head.fusion[0][0].in_channels == 16
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = net(x)
        torch.nn.init.zeros_(net.stages[2].head.fusion[0][1].weight)  # the fusion BN scale: fusion off
        assert not torch.allclose(out, net(x))


@pytest.mark.parametrize("stages, message", [
    ((StageSpec(16, "mixvarge_f2", (), 2), StageSpec(16, "mixvarge_f2", (), 2, fusion_strides=(2,))),
     "no earlier stage with downsample layers"),
    ((StageSpec(16, "mixvarge_f2", (), 2, extra_downsample_num=1),
      StageSpec(16, "mixvarge_f2", (), 2), StageSpec(16, "mixvarge_f2", (), 2, fusion_strides=(2,))),
     "cannot fuse stride 2: stage 1 has 1 downsample layers"),
])
def test_impossible_fusion_is_refused(stages, message):
    with pytest.raises(ValueError, match=message):
        MixVarGENet(num_classes=3, stages=stages, stem_channels=16, stem_stride=1)


# -- recipe schema -------------------------------------------------------------------------------
def test_default_config_builds_the_imagenet_network():
    cfg = config()
    assert cfg.stage_specs() == list(IMAGENET_STAGES) and cfg.stem_width() == 32


def test_stage_strides_and_width_adapt_the_layout():
    cfg = config(stem_stride=1, stage_strides=[1, 2, 2, 2, 1], width=0.5)
    specs = cfg.stage_specs()
    assert [s.stride for s in specs] == [1, 2, 2, 2, 1]
    assert [s.out_channels for s in specs] == [16, 16, 32, 48, 80] and cfg.stem_width() == 16
    net = MixVarGENetFamily().build_float_model(cfg, 10)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("table, message", [
    ({"stage_strides": [1, 2]}, "needs 5 values"),
    ({"stage_strides": [1, 2, 2, 2, 3]}, "stage_strides"),
    ({"depth": 3}, "depth"),
    ({"stem_stride": 4}, "stem_stride"),
    ({"stages": []}, "at least one stage"),
    ({"stages": [{"out_channels": 24, "head_op": "mixvarge_f2", "stride": 2},
                 {"out_channels": 32, "head_op": "mixvarge_f2_gb16", "stride": 2}]},
     "stage 2, block 1 .*multiple of 16, got 24"),
    ({"stages": [{"out_channels": 32, "head_op": "mixvarge_f8", "stride": 2}]}, "head_op"),
    ({"stages": [{"out_channels": 32, "head_op": "mixvarge_f2", "stride": 2, "fusion_strides": [4]}]},
     "fusion stride 4"),
])
def test_bad_model_tables_are_refused_with_the_reason(table, message):
    with pytest.raises(ValidationError, match=message):
        config(**table)


# -- quantization --------------------------------------------------------------------------------
def test_every_op_is_quantized_and_computed_in_integers_on_nash_e():
    net = tiny_net().eval()
    prepared, quantizer = prepare_quantized(MixVarGENetFamily(), net, (16, 16), load_march("nash_e"), [])
    set_mode(prepared, "calibrate")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn(4, 3, 16, 16, generator=gen))
    assert quantizer.unquantized == []
    integer = integer_program(convert_to_integer(prepared))
    kinds = collections.Counter(op.split()[0] for op in integer.integer_ops)
    convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    blocks = sum(1 + len(s.stack) for s in net.stages)
    fusions = sum(len(s.head.fusion) for s in net.stages)
    assert kinds == {"quantize": 1, "conv2d": convs, "add": blocks + fusions, "global_avg_pool": 1, "linear": 1}
    with torch.no_grad():
        logits = integer(torch.randn(3, 3, 16, 16, generator=gen))
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
