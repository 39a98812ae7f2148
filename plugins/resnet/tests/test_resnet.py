"""ResNet: the published CIFAR parameter counts, torchvision's ImageNet layout, every structure
variant (pre-activation, shortcuts, Bi-Real, activations), the recipe schema, the deploy model,
and quantization of every variant through hat's PT2E flow."""

from __future__ import annotations

import collections
import inspect
import warnings

import pytest
import torch
import torchvision
from pydantic import ValidationError
from torch import nn

from hat_resnet.family import ResNetConfig, ResNetFamily
from hat_resnet.model import BasicBlock, Bottleneck, PadShortcut
from hatcli.quant.flow import convert_to_integer, export_deploy_graph, prepare_quantized, set_mode
from hatcli.quant.integer import integer_program
from hatcli.quant.march import load_march

FAMILY = ResNetFamily()

VARIANTS = {
    "post": {},
    "pre": {"order": "pre"},
    "avgpool": {"shortcut": "avgpool"},
    "pad": {"shortcut": "pad"},
    "bireal": {"bireal": True},
    "bireal-pre": {"bireal": True, "order": "pre"},
    "prelu": {"activation": "prelu"},
    "none": {"activation": "none"},
    "bireal-pre-hardtanh": {"bireal": True, "order": "pre", "activation": "hardtanh"},
    "pre-avgpool-prelu": {"order": "pre", "shortcut": "avgpool", "activation": "prelu"},
}
"""The structure keys each variant sets (on top of a tiny depth)."""
TINY = {"cifar20": {"depth": 20, "width": 0.25}, "imagenet18": {"depth": 18, "width": 0.125},
        "imagenet50": {"depth": 50, "width": 0.125}}
"""One tiny network per block kind and stem."""


def config(**table) -> ResNetConfig:
    """Validate a `[model]` table of `resnet` with these keys."""
    return ResNetConfig.model_validate({"name": "resnet", **table})


def build(num_classes: int = 10, **table) -> nn.Module:
    """The family's float model for this `[model]` table, seeded."""
    torch.manual_seed(0)
    return FAMILY.build_float_model(config(**table), num_classes)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_norms(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine, so a wrong fold shows; eval mode."""
    generator = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


# -- the published layouts -----------------------------------------------------------------------
@pytest.mark.parametrize("depth, published", [(20, 0.27e6), (32, 0.46e6), (56, 0.85e6)])
def test_cifar_depths_have_he_et_al_parameter_counts(depth, published):
    """He et al. 2016, table 6 (10 classes); their CIFAR networks use option-A shortcuts (`pad`)."""
    option_a = params(build(depth=depth, shortcut="pad"))
    assert abs(option_a / published - 1) < 0.01, option_a
    # the 1x1-conv shortcuts (16->32, 32->64, each with a BN) add 576 + 2176 parameters
    assert params(build(depth=depth)) == params(build(depth=depth, shortcut="avgpool")) == option_a + 2752


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_imagenet_depths_are_torchvisions_networks(depth):
    ours = build(1000, depth=depth).eval()
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    assert params(ours) == params(theirs)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert [(k, v.shape) for k, v in ours_state.items()] == [(k, v.shape) for k, v in theirs_state.items()]
    ours.load_state_dict(theirs_state)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_resnet18_module_names_are_torchvisions():
    ours = dict(build(1000, depth=18).named_modules())
    theirs = {name for name, m in torchvision.models.resnet18(weights=None).named_modules()
              if not isinstance(m, nn.ReLU)}
    assert theirs <= set(ours)  # torchvision shares one `relu` per block; ours are `act1`, `act2`
    assert {"conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer2.0.downsample.0",
            "layer2.0.downsample.1", "fc"} <= set(ours)


# -- stems, widths, output shapes ----------------------------------------------------------------
def test_auto_stem_is_cifar_for_20_32_56_and_imagenet_for_18_34_50():
    assert [config(depth=d).resolved_stem() for d in (20, 32, 56, 18, 34, 50)] == ["cifar"] * 3 + ["imagenet"] * 3
    cifar, imagenet = build(depth=20), build(depth=18, width=0.125)
    assert (cifar.conv1.kernel_size, cifar.conv1.stride, cifar.conv1.out_channels) == ((3, 3), (1, 1), 16)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert (imagenet.conv1.kernel_size, imagenet.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)


def test_cifar_stem_on_resnet18_keeps_full_resolution():
    net = build(depth=18, width=0.125, stem="cifar").eval()
    assert (net.conv1.kernel_size, net.conv1.stride) == ((3, 3), (1, 1)) and isinstance(net.maxpool, nn.Identity)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert net.layer1(net.conv1(x)).shape[-2:] == (32, 32)
        assert net.layer4(net.layer3(net.layer2(net.layer1(net.conv1(x))))).shape[-2:] == (4, 4)


def test_width_scales_every_stage_rounding_half_up_to_at_least_one():
    assert [b.conv2.out_channels for b in build(depth=20, width=0.25).layer1] == [4, 4, 4]
    net = build(depth=20, width=0.25)
    assert [net.layer1[0].conv1.out_channels, net.layer2[0].conv1.out_channels,
            net.layer3[0].conv1.out_channels, net.fc.in_features] == [4, 8, 16, 16]
    tiny = build(depth=20, width=0.01)
    assert {m.out_channels for m in tiny.modules() if isinstance(m, nn.Conv2d)} == {1}
    wide = build(depth=50, width=0.125)
    assert wide.fc.in_features == 64 * 4 and wide.layer1[0].conv1.out_channels == 8


@pytest.mark.parametrize("tiny", list(TINY), ids=list(TINY))
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_every_variant_gives_logits_at_32_and_64_pixels(variant, tiny):
    table = {**TINY[tiny], **VARIANTS[variant]}
    if table["depth"] == 50 and table.get("bireal"):
        pytest.skip("bireal needs BasicBlocks")
    net = build(7, **table).eval()
    with torch.no_grad():
        for side in (32, 64):
            logits = net(torch.randn(2, 3, side, side))
            assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    net.train()
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_dropout_sits_before_fc():
    assert isinstance(build(depth=20, width=0.25).dropout, nn.Identity)
    assert build(depth=20, width=0.25, dropout=0.2).dropout.p == 0.2


# -- what each block computes --------------------------------------------------------------------
def test_post_activation_block_is_conv_bn_relu_and_relu_after_the_sum():
    block = randomize_norms(build(depth=20, width=0.25)).layer1[1]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))) + x)
        torch.testing.assert_close(block(x), expected)


def test_pre_activation_block_is_bn_relu_conv_and_leaves_the_sum_alone():
    net = randomize_norms(build(depth=20, width=0.25, order="pre"))
    block = net.layer1[1]
    assert block.bn1.num_features == block.conv1.in_channels  # the BN normalizes the block's input
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = block.conv2(torch.relu(block.bn2(block.conv1(torch.relu(block.bn1(x)))))) + x
        torch.testing.assert_close(block(x), expected)
    # the network ends with BN -> ReLU before pooling; the stem is the conv alone
    assert isinstance(net.bn_final, nn.BatchNorm2d) and isinstance(net.act_final, nn.ReLU)
    assert isinstance(net.bn1, nn.Identity) and isinstance(net.act1, nn.Identity)
    # a projection shortcut reads the pre-activated input and has no BN
    down = net.layer2[0]
    assert [type(m) for m in down.downsample] == [nn.Conv2d]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        pre = torch.relu(down.bn1(x))
        expected = down.conv2(torch.relu(down.bn2(down.conv1(pre)))) + down.downsample(pre)
        torch.testing.assert_close(down(x), expected)


def test_post_activation_network_has_no_final_bn():
    net = build(depth=20, width=0.25)
    assert isinstance(net.bn_final, nn.Identity) and isinstance(net.act_final, nn.Identity)


def test_avgpool_shortcut_pools_with_ceil_mode_then_a_stride_one_conv():
    block = build(depth=20, width=0.25, shortcut="avgpool").layer2[0]
    pool, conv, bn = block.downsample
    assert isinstance(pool, nn.AvgPool2d) and (pool.kernel_size, pool.stride) == (2, 2)
    assert pool.ceil_mode and not pool.count_include_pad
    assert (conv.kernel_size, conv.stride) == ((1, 1), (1, 1)) and isinstance(bn, nn.BatchNorm2d)
    assert block(torch.randn(1, 4, 7, 7)).shape == (1, 8, 4, 4)  # an odd side: both branches ceil
    # a shortcut that changes only the channels has no pool (depth 50's first block)
    first = build(depth=50, width=0.125, shortcut="avgpool").layer1[0]
    assert isinstance(first.downsample[0], nn.Identity) and first.downsample[1].stride == (1, 1)


def test_pad_shortcut_subsamples_and_zero_pads_channels():
    block = build(depth=20, width=0.25, shortcut="pad").layer2[0]
    assert isinstance(block.downsample, PadShortcut) and not list(block.downsample.parameters())
    x = torch.randn(1, 4, 7, 7)
    y = block.downsample(x)
    assert y.shape == (1, 8, 4, 4)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2]) and not y[:, :2].any() and not y[:, 6:].any()


def test_bireal_gives_every_conv_its_own_shortcut():
    net = randomize_norms(build(depth=20, width=0.25, bireal=True))
    block, down = net.layer1[1], net.layer2[0]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        first = torch.relu(block.bn1(block.conv1(x)) + x)
        torch.testing.assert_close(block(x), torch.relu(block.bn2(block.conv2(first)) + first))
        # the shape-changing shortcut sits on the first conv
        first = torch.relu(down.bn1(down.conv1(x)) + down.downsample(x))
        torch.testing.assert_close(down(x), torch.relu(down.bn2(down.conv2(first)) + first))


def test_bireal_pre_is_bi_real_nets_activation_conv_bn_unit():
    net = randomize_norms(build(depth=20, width=0.25, bireal=True, order="pre", activation="none"))
    block = net.layer1[1]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        first = block.bn1(block.conv1(x)) + x
        torch.testing.assert_close(block(x), block.bn2(block.conv2(first)) + first)
    assert isinstance(net.bn1, nn.BatchNorm2d) and isinstance(net.act1, nn.Identity)  # stem: conv -> BN


@pytest.mark.parametrize("variant", ["post", "pre", "bireal", "bireal-pre"])
def test_activation_modules_follow_the_activation_key(variant):
    for kind, module in (("relu", nn.ReLU), ("prelu", nn.PReLU), ("hardtanh", nn.Hardtanh)):
        net = build(depth=20, width=0.25, activation=kind, **VARIANTS[variant])
        acts = {name: m for name, m in net.named_modules() if isinstance(m, (nn.ReLU, nn.PReLU, nn.Hardtanh))}
        assert acts and all(isinstance(m, module) for m in acts.values())
        assert all("act" in name.rsplit(".", 1)[-1] for name in acts)
        if kind in ("relu", "hardtanh"):
            assert not any(m.inplace for m in acts.values())
        else:  # one slope per channel of the tensor it activates
            assert all(m.num_parameters in (4, 8, 16) for m in acts.values())
    net = build(depth=20, width=0.25, activation="none", **VARIANTS[variant])
    assert not any(isinstance(m, (nn.ReLU, nn.PReLU)) for m in net.modules())


def test_without_activations_the_network_is_affine():
    net = randomize_norms(build(depth=20, width=0.25, activation="none"))
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(net(a + b) + net(torch.zeros_like(a)), net(a) + net(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_shortcut_convs_live_under_downsample(variant):
    net = build(depth=20, width=0.25, **VARIANTS[variant])
    convs = [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    shortcut = [name for name in convs if ".downsample." in name]
    assert all(name.split(".")[-1].startswith("conv") for name in set(convs) - set(shortcut))
    assert len(shortcut) == (0 if variant == "pad" else 2)


# -- recipe schema -------------------------------------------------------------------------------
def test_defaults():
    cfg = config()
    assert (cfg.depth, cfg.width, cfg.stem, cfg.order, cfg.shortcut, cfg.bireal, cfg.activation, cfg.dropout,
            cfg.num_classes) == (18, 1.0, "auto", "post", "conv", False, "relu", 0.0, None)


def test_every_field_has_a_docstring():
    lines = inspect.getsource(ResNetConfig).splitlines()
    own = [name for name in ResNetConfig.model_fields if name in ResNetConfig.__annotations__]
    assert set(own) == {"depth", "width", "stem", "order", "shortcut", "bireal", "activation", "dropout"}
    for name in own:
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
        assert lines[index + 1].strip().startswith('"""'), name


@pytest.mark.parametrize("table, message", [
    ({"depth": 19}, "depth must be 18, 34 or 50 .* or 20, 32 or 56 .*got 19"),
    ({"depth": 50, "bireal": True}, "bireal needs BasicBlocks.*depth 50"),
    ({"stem": "tiny"}, "stem"),
    ({"order": "middle"}, "order"),
    ({"shortcut": "identity"}, "shortcut"),
    ({"activation": "gelu"}, "activation"),
    ({"width": 0}, "width"),
    ({"dropout": 1.0}, "dropout"),
    ({"depht": 20}, "depht"),
])
def test_bad_model_tables_are_refused_with_the_reason(table, message):
    with pytest.raises(ValidationError, match=message):
        config(**table)


def test_tiny_config_is_a_small_cifar_network():
    cfg = FAMILY.tiny_config()
    assert (cfg.depth, cfg.width, cfg.resolved_stem()) == (20, 0.25, "cifar")
    assert params(FAMILY.build_float_model(cfg, 10)) < 20_000
    assert FAMILY.min_input_size == (32, 32)


# -- deploy model --------------------------------------------------------------------------------
EXPORT_CASES = [("cifar20", v) for v in VARIANTS] + [("imagenet50", "post"), ("imagenet50", "pre-avgpool-prelu")]


@pytest.mark.parametrize("tiny, variant", EXPORT_CASES, ids=[f"{t}-{v}" for t, v in EXPORT_CASES])
def test_exported_deploy_graph_computes_what_the_float_model_computes(tiny, variant):
    """BatchNorm folding is checked on non-trivial statistics: in a pre-activation network the stem
    conv's output feeds both the first BN and the shortcut, so a BN folded into that conv would
    change the shortcut too."""
    table = {**TINY[tiny], **VARIANTS[variant]}
    net = randomize_norms(build(**table))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = export_deploy_graph(FAMILY, net, (32, 32))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(graph(x), expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-4)
    assert not any("batch_norm" in str(n.target) for n in graph.graph.nodes)


def test_deploy_model_turns_pre_activation_bns_into_depthwise_convs():
    net = randomize_norms(build(depth=20, width=0.25, order="pre"))
    deploy = FAMILY.build_deploy_model(net)
    assert deploy is not net and isinstance(net.layer1[0].bn1, nn.BatchNorm2d)  # the float model is kept
    for name in ("layer1.0.bn1", "layer3.2.bn1", "bn_final"):
        conv = deploy.get_submodule(name)
        assert isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels
    assert isinstance(deploy.layer1[0].bn2, nn.BatchNorm2d)  # after a conv: folded at export
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), net(x))
    post = build(depth=20, width=0.25)
    assert FAMILY.build_deploy_model(post) is post


# -- quantization --------------------------------------------------------------------------------
QUANT_CASES = {**{f"cifar20-{v}": {**TINY["cifar20"], **t} for v, t in VARIANTS.items()},
               "imagenet18-avgpool": {**TINY["imagenet18"], "shortcut": "avgpool"},
               "imagenet50-post": TINY["imagenet50"],
               "imagenet50-pre": {**TINY["imagenet50"], "order": "pre"}}


@pytest.mark.parametrize("case", list(QUANT_CASES), ids=list(QUANT_CASES))
def test_every_variant_calibrates_and_converts_to_the_integer_program(case):
    table = QUANT_CASES[case]
    net = build(**table).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared, quantizer = prepare_quantized(FAMILY, net, (32, 32), load_march("nash_e"), [])
        set_mode(prepared, "calibrate")
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(2):
                prepared(torch.randn(4, 3, 32, 32, generator=gen))
        integer = integer_program(convert_to_integer(prepared))
    if table.get("activation") == "prelu":
        # hat's quantizer has no PReLU kernel yet: the PReLUs stay float, and only they do
        assert quantizer.unquantized and all("prelu" in op and "act" in op for op in quantizer.unquantized)
    else:
        assert quantizer.unquantized == []
    kinds = collections.Counter(op.split()[0] for op in integer.integer_ops)
    deploy = FAMILY.build_deploy_model(net)
    assert kinds["conv2d"] == sum(isinstance(m, nn.Conv2d) for m in deploy.modules())
    assert kinds["add"] == len(blocks(net)) * (2 if table.get("bireal") else 1)
    assert kinds["linear"] == 1 and kinds["global_avg_pool"] == 1
    with torch.no_grad():
        logits = integer(torch.randn(3, 3, 32, 32, generator=gen))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


def test_downsample_pattern_finds_the_shortcut_convs_for_int16():
    net = build(**TINY["cifar20"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, quantizer = prepare_quantized(FAMILY, net, (32, 32), load_march("nash_e"), ["*downsample*"])
    assert len(quantizer.int16_nodes) >= 2 and all("downsample" in n for n in quantizer.int16_nodes)
