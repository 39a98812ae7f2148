"""The network: EfficientNet-B0 stage table, BiFPN / head output shapes, config schema, training."""

from __future__ import annotations

import pytest
import torch
import torchvision
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

from hat_fcos_efficientnet.backbone import B0_STAGES, EfficientNet, MBConv
from hat_fcos_efficientnet.family import FcosEfficientNetConfig, FcosEfficientNetFamily

FAMILY = FcosEfficientNetFamily()


def tiny_config() -> FcosEfficientNetConfig:
    """The family's own small config (what the core's per-family tests build)."""
    return FAMILY.tiny_config()


def macs(model: torch.nn.Module, size: int) -> float:
    """Multiply-accumulates of one forward pass at size x size (FlopCounterMode counts 2 per MAC)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2


def test_the_family_is_registered_through_its_entry_point():
    from hatcli.plugins import families

    family = families().get("fcos_efficientnet_b0")
    assert family.task == "detection" and family.config_class is FcosEfficientNetConfig


def test_five_levels_of_class_box_and_centerness_maps_in_output_name_order():
    model = FAMILY.build_float_model(tiny_config(), num_classes=7)
    outputs = model(torch.randn(2, 3, 128, 128))
    assert len(outputs) == 15 == len(FAMILY.output_names)
    assert FAMILY.output_names[:2] == ["cls_s8", "cls_s16"] and FAMILY.output_names[-1] == "ctr_s128"
    for name, out in zip(FAMILY.output_names, outputs):
        kind, stride = name.split("_s")
        channels = {"cls": 7, "bbox": 4, "ctr": 1}[kind]
        assert tuple(out.shape) == (2, channels, 128 // int(stride), 128 // int(stride)), name


def test_the_deploy_copy_unshares_the_head_and_computes_the_same_maps():
    torch.manual_seed(0)
    model = FAMILY.build_float_model(tiny_config(), num_classes=3)
    for m in model.modules():  # non-trivial BatchNorm statistics, different per level
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model.eval()
    deploy = FAMILY.build_deploy_model(model).eval()
    assert len(model.head.cls_convs) == 1 and len(deploy.head.cls_convs) == 5
    assert deploy.head.cls_convs[0][0].weight.data_ptr() != deploy.head.cls_convs[1][0].weight.data_ptr()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), deploy(x)))


def test_backbone_follows_the_efficientnet_b0_stage_table():
    net = EfficientNet()
    assert [s.channels for s in B0_STAGES] == [16, 24, 40, 80, 112, 192, 320]
    assert [len(stage) for stage in net.stages] == [1, 2, 2, 3, 3, 4, 1]
    kernels = [stage[0].block[-2][0].kernel_size[0] for stage in net.stages]  # the depthwise conv
    assert kernels == [3, 3, 5, 3, 5, 5, 3]
    assert all(isinstance(m, torch.nn.ReLU) for m in net.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.SiLU)))
    features = net.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == net.out_channels == [16, 24, 40, 112, 320]
    assert [64 // f.shape[-1] for f in features] == net.out_strides == [2, 4, 8, 16, 32]


def test_backbone_has_torchvision_b0_weights_and_macs_without_the_top():
    """With squeeze-excite, our backbone and torchvision's B0 features (less the 1x1 head conv)
    hold the same parameters and the same conv MACs; ReLU instead of SiLU changes neither."""
    ours = EfficientNet(se=True)
    reference = torchvision.models.efficientnet_b0().features[:-1]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) == 3_595_388
    ours_macs = macs(ours, 224)
    assert ours_macs == macs(reference, 224)
    # B0's published 0.39 G MACs include the 320 -> 1280 head conv at 7x7 and the classifier
    top = 320 * 1280 * 7 * 7 + 1280 * 1000
    assert 0.37e9 < ours_macs + top < 0.40e9
    no_se = EfficientNet(se=False)
    assert ours_macs - macs(no_se, 224) < 0.01 * ours_macs  # SE costs parameters, hardly any MACs
    assert sum(p.numel() for p in no_se.parameters()) < 0.85 * 3_595_388


def test_width_and_depth_multipliers_shrink_the_backbone():
    small = EfficientNet(width_mult=0.5, depth_mult=0.5)
    assert small.out_channels == [8, 16, 24, 56, 160]
    assert [len(stage) for stage in small.stages] == [1, 1, 1, 2, 2, 2, 1]
    assert all(isinstance(b, MBConv) for stage in small.stages for b in stage)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="extra"):
        FcosEfficientNetConfig(name=FAMILY.name, widht_mult=0.5)
    with pytest.raises(ValidationError, match="nms_iou"):
        FcosEfficientNetConfig(name=FAMILY.name, nms_iou=1.5)
    cfg = FcosEfficientNetConfig(name=FAMILY.name)
    assert (cfg.score_threshold, cfg.nms_pre, cfg.nms_iou, cfg.max_per_img) == (0.05, 1000, 0.6, 100)
    assert (cfg.center_radius, cfg.focal_alpha, cfg.focal_gamma, cfg.se) == (1.5, 0.25, 2.0, False)


def test_a_few_training_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = FAMILY.build_float_model(cfg, num_classes=3).train()
    images = torch.randn(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 60.0]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[30.0, 30.0, 100.0, 110.0]]), "labels": torch.tensor([1])}]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = FAMILY.loss(model(images), targets, config=cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
