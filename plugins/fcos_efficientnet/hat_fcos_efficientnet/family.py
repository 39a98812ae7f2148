"""The `fcos_efficientnet_b0` family: its `[model]` schema, the network, loss and decoder."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from pydantic import Field

from hatcli.family import FamilyConfig
from hatcli.tasks.detection import DetectionFamily, Detections
from hat_fcos_efficientnet.bifpn import NUM_LEVELS, OUT_STRIDES
from hat_fcos_efficientnet.decoder import DecoderSettings, decode, describe
from hat_fcos_efficientnet.losses import LossSettings, fcos_loss
from hat_fcos_efficientnet.model import FcosEfficientNet, output_names

HEAD_OUTPUT_CONVS = ["head.cls_out.*", "head.bbox_out.*", "head.ctr_out.*"]
"""Module patterns of the head's final convs in the deploy model (one module per level)."""


class FcosEfficientNetConfig(FamilyConfig):
    """`[model]` table of `fcos_efficientnet_b0`; the defaults are HAT's `fcos_efficientnetb0_mscoco`."""

    num_classes: int | None = Field(None, ge=1)
    """Number of classes; by default the packed dataset's."""
    # network
    width_mult: float = Field(1.0, gt=0, le=4)
    """Backbone channel multiplier (1.0: EfficientNet-B0)."""
    depth_mult: float = Field(1.0, gt=0, le=4)
    """Backbone block-count multiplier (1.0: EfficientNet-B0)."""
    se: bool = False
    """Squeeze-excite in the MBConv blocks (HAT's BPU variant has none)."""
    channels: int = Field(64, ge=8, le=512)
    """Width of the BiFPN and of the head towers."""
    neck_layers: int = Field(3, ge=1, le=8)
    """Stacked BiFPN layers."""
    separable: bool = True
    """BiFPN fusion convs: depthwise-separable (true) or plain 3x3."""
    head_convs: int = Field(4, ge=1, le=8)
    """3x3 conv + BN + ReLU layers in each head tower."""
    share_head: bool = True
    """Share the head's conv weights across levels in float training (per-level BatchNorm)."""
    # target assignment and loss
    center_radius: float = Field(1.5, gt=0)
    """Center sampling radius, in strides."""
    topk: int = Field(10, ge=1)
    """q of the dynamic k: k = max(1, int(sum of a box's q best IoUs))."""
    reg_cost_weight: float = Field(2.0, ge=0)
    """Weight of (1 - GIoU) in the assignment cost."""
    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    cls_weight: float = Field(1.0, ge=0)
    reg_weight: float = Field(1.0, ge=0)
    ctr_weight: float = Field(1.0, ge=0)
    # decoder
    score_threshold: float = Field(0.05, ge=0, lt=1)
    nms_pre: int = Field(1000, ge=1)
    """Candidates kept per image before NMS."""
    nms_iou: float = Field(0.6, gt=0, le=1)
    max_per_img: int = Field(100, ge=1)
    score_sqrt: bool = True
    """Score = sqrt(sigmoid(cls) * sigmoid(centerness)) (HAT's `nms_sqrt`); false: the product."""

    def loss_settings(self) -> LossSettings:
        """The assignment and loss keys."""
        return LossSettings(self.center_radius, self.topk, self.reg_cost_weight, self.focal_alpha,
                            self.focal_gamma, self.cls_weight, self.reg_weight, self.ctr_weight)

    def decoder_settings(self) -> DecoderSettings:
        """The decoder keys."""
        return DecoderSettings(self.score_threshold, self.nms_pre, self.nms_iou, self.max_per_img, self.score_sqrt)


class FcosEfficientNetFamily(DetectionFamily):
    """FCOS with an EfficientNet-B0 backbone (ReLU, no SE) and a 3-layer sum-fusion BiFPN."""

    name: ClassVar[str] = "fcos_efficientnet_b0"
    config_class: ClassVar[type[FamilyConfig]] = FcosEfficientNetConfig
    description: ClassVar[str] = "FCOS + EfficientNet-B0 + BiFPN (HAT fcos_efficientnetb0_mscoco), detection"
    output_names: ClassVar[list[str]] = output_names(NUM_LEVELS)
    min_input_size: ClassVar[tuple[int, int]] = (128, 128)
    """Five levels down to stride 128, each exactly half the one before."""

    def tiny_config(self) -> FamilyConfig:
        """A quarter-width, one-block-per-stage network, 16 channels, one BiFPN layer, one-conv towers."""
        return FcosEfficientNetConfig(name=self.name, width_mult=0.25, depth_mult=0.34, channels=16, neck_layers=1,
                                      head_convs=1)

    def _config(self, config: FamilyConfig | None) -> FcosEfficientNetConfig:
        if config is None:
            return FcosEfficientNetConfig(name=self.name)
        assert isinstance(config, FcosEfficientNetConfig)
        return config

    def build_float_model(self, config: FamilyConfig, num_classes: int) -> torch.nn.Module:
        """Build the detector from the recipe's `[model]` table."""
        cfg = self._config(config)
        return FcosEfficientNet(num_classes, cfg.width_mult, cfg.depth_mult, cfg.se, cfg.channels,
                                cfg.neck_layers, cfg.separable, cfg.head_convs, cfg.share_head)

    def build_deploy_model(self, float_model: torch.nn.Module) -> torch.nn.Module:
        """The same network with the head unshared per level (each conv folds its own BatchNorm)."""
        assert isinstance(float_model, FcosEfficientNet)
        return float_model.deploy_copy()

    def loss(self, outputs: Any, targets: list[dict[str, Any]], label_smoothing: float = 0.0,
             config: FamilyConfig | None = None) -> torch.Tensor:
        """FCOS loss (focal + centerness-weighted GIoU + centerness BCE); `label_smoothing` is unused."""
        total, _ = fcos_loss(outputs, targets, list(OUT_STRIDES), self._config(config).loss_settings())
        return total

    def predict(self, outputs: Any, topk: int = 100, config: FamilyConfig | None = None) -> list[Detections]:
        """Decode raw head maps into at most min(`topk`, `max_per_img`) detections per image."""
        settings = self._config(config).decoder_settings()
        if topk < settings.max_per_img:
            settings = dataclasses.replace(settings, max_per_img=topk)
        return decode(outputs, list(OUT_STRIDES), settings)

    def describe_outputs(self, config: FamilyConfig, input_size: tuple[int, int],
                         num_classes: int) -> list[dict[str, Any]]:
        """Per output: shape, axes, values, stride and the decoding `predict` applies, with the
        recipe's decoder settings (`decoder.describe`)."""
        return describe(input_size, num_classes, list(OUT_STRIDES), self._config(config).decoder_settings())

    def int16_outputs(self, config: FamilyConfig) -> list[str]:
        """The head's output convs (`head.cls_out.*`, `head.bbox_out.*`, `head.ctr_out.*`).

        HAT keeps the FCOS head outputs out of int8 (`int8_output=False, dequant_output=True`).
        Here every one of these convs is a graph output, which the quantizer already leaves as its
        int32 accumulator, dequantized, on every march: as `quant.int16` patterns they are accepted
        on the marches with int16 and select no quantizer, so they change nothing; on `host` (no
        int16) `prepare_quantized` refuses any pattern, so they must not be passed there.
        """
        return list(HEAD_OUTPUT_CONVS)
