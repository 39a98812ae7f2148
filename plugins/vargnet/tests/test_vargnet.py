"""VargNetV2: variable group convolutions, the block with its shortcut and merged branch, HAT's
stage layout, the recipe schema, and the network in integers on a BPU march."""

from __future__ import annotations

import collections

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from hat_vargnet.family import VargNetV2Config, VargNetV2Family
from hat_vargnet.model import IMAGENET_UNITS, VarGBlock, VargNetV2, scaled_channels
from hatcli.quant.flow import convert_to_integer, prepare_quantized, set_mode
from hatcli.quant.integer import integer_program
from hatcli.quant.march import load_march


def config(**table) -> VargNetV2Config:
    """Validate a `[model]` table of `vargnet_v2` with these keys."""
    return VargNetV2Config.model_validate({"name": "vargnet_v2", **table})


def grouped_convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]


def test_every_grouped_conv_has_group_base_input_channels_per_group():
    net = VargNetV2(10)
    first, later = grouped_convs(net.stages[0]), grouped_convs(net.stages[1:])
    assert len(grouped_convs(net)) == len(first) + len(later)  # only the stages' convs are grouped
    assert all(conv.in_channels // conv.groups == 8 for conv in first + later)
    assert all(conv.out_channels == conv.in_channels for conv in first)  # head_factor 1
    assert all(conv.out_channels == 2 * conv.in_channels for conv in later)  # factor 2


def test_a_block_adds_its_shortcut_and_a_first_block_merges_a_second_branch():
    kept = VarGBlock(16, 16, 1, 2, 8).eval()
    assert kept.shortcut is None and kept.branch is None
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(kept(x), torch.relu(kept.out_conv(kept.conv(x)) + x))
    merged = VarGBlock(16, 32, 2, 2, 8, merge_branch=True).eval()
    assert merged.shortcut is not None and merged.branch is not None
    with torch.no_grad():
        y = torch.relu(merged.conv(x) + merged.branch(x))
        assert torch.equal(merged(x), torch.relu(merged.out_conv(y) + merged.shortcut(x)))
    assert merged(x).shape == (2, 32, 4, 4)


def test_the_layout_is_four_stages_of_one_three_seven_and_four_blocks_down_to_stride_32():
    net = VargNetV2(1000).eval()
    assert [len(stage) for stage in net.stages] == list(IMAGENET_UNITS) == [1, 3, 7, 4]
    assert [stage[0].branch is not None for stage in net.stages] == [False, True, True, True]
    features = net.stem(torch.zeros(1, 3, 224, 224))
    sides = [features.shape[-1]]
    for stage in net.stages:
        features = stage(features)
        sides.append(features.shape[-1])
    assert sides == [112, 56, 28, 14, 7] and features.shape[1] == 256
    assert net(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_alpha_keeps_whole_groups():
    assert scaled_channels(0.5, 8) == [16, 16, 32, 64, 128]
    assert scaled_channels(0.3, 8) == [8, 8, 16, 40, 80]
    net = VargNetV2Family().build_float_model(config(alpha=0.5, stem_stride=1, stage_strides=[1, 2, 2, 2]), 7)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert all(conv.in_channels % 8 == 0 for conv in grouped_convs(net))


@pytest.mark.parametrize("table, message", [
    ({"stage_strides": [2, 2]}, "needs 4 values"),
    ({"group_base": 6}, "group_base"),
    ({"variant": "huge"}, "variant"),
    ({"depth": 18}, "depth"),
])
def test_bad_model_tables_are_refused_with_the_reason(table, message):
    with pytest.raises(ValidationError, match=message):
        config(**table)


def test_every_layer_is_quantized_and_computed_in_integers_on_nash_e():
    family = VargNetV2Family()
    net = family.build_float_model(config(variant="tiny", alpha=0.25, last_channels=32, stem_stride=1), 5).eval()
    prepared, quantizer = prepare_quantized(family, net, (16, 16), load_march("nash_e"), [])
    set_mode(prepared, "calibrate")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn(4, 3, 16, 16, generator=gen))
    assert quantizer.unquantized == []
    integer = integer_program(convert_to_integer(prepared))
    kinds = collections.Counter(op.split()[0] for op in integer.integer_ops)
    blocks = [m for m in net.modules() if isinstance(m, VarGBlock)]
    adds = len(blocks) + sum(block.branch is not None for block in blocks)
    convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert kinds == {"quantize": 1, "conv2d": convs, "add": adds, "global_avg_pool": 1, "linear": 1}
