"""Rebuild catalogue of the published BPU latency table (`bpu_latency_public.csv`).

For every distinct (march, model) of the table this module says how to rebuild the network the
board ran - library, constructor and arguments, re-parameterization, where the graph ends - or,
in `NOT_REBUILT`, why it cannot be rebuilt faithfully. `build()` returns the network (random
weights: only the graph matters) as an eval-mode `torch.nn.Module`. The input size always comes
from the CSV row. Nothing heavy happens at import: timm, ultralytics, torchvision and hat's
plugins are imported inside the builders.

Sources checked (D-Robotics rdk_model_zoo / rdk_model_zoo_s):

- X5 classification table (samples/vision/classification): each model names its source (timm
  `create_model(..., pretrained=True)`, the reference repositories of MobileOne and FastViT,
  the OE "Horizon reference" models for ResNet18 / MobileNetV2 / GoogLeNet) and prints a
  parameter count, counted on the simplified ONNX (BatchNorm folded, re-parameterized):
  `published_params_m` below; `build_info()` gives the count of the rebuilt network.
- X3 classification table (rdk_x3 demos): bare family names; the variant is the one whose
  parameter count and accuracy match the X5 table (e.g. `RepVGG` 12.78 M = RepVGG-A1).
- Ultralytics YOLO (samples/vision/ultralytics_yolo/conversion/export_monkey_patch.py, and the
  yolo26 exporters): the head ends at the last convolution of every branch, each output
  permuted to NHWC - per level (cls, box), plus mask coefficients and the proto map for
  segmentation, plus keypoints for pose; YOLOv10 and YOLO26 use the one-to-one branch; the
  classifier ends at the linear layer (no softmax; YOLO26: the linear as a 1x1 conv, NHWC).
  The X5 exporter also rewrites the attention of `Attention` (C2PSA / PSA) and `AAttn` (YOLO12)
  with an explicit max / exp / sum / divide softmax over the key axis moved to dim 1: done here
  for the X5 `ultralytics_yolo` rows (`attention="decomposed"`, bench/bpu_yolo.py); the YOLO26 exporters and the S100
  zoo keep the stock softmax (the S100 compile config quantizes a Softmax op).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "bpu_latency_public.csv"
"""Where the table lives in a checkout (`../shared/data/` from the project root)."""

HAT_ZOO_MD = DEFAULT_CSV.parent / "hat_modelzoo_latency.md"
"""The HAT model zoo's Journey 5 figures (three BPU latencies), beside the table."""

MARCHES = ("bayes-e", "bernoulli2", "nash-e", "bayes")
"""The CSV's chips, and `bayes` (Journey 5) for the HAT model zoo's latencies."""
GROUPS = ("yolo_detect", "yolo_seg", "yolo_pose", "yolo_cls", "cnn_classifier", "transformer_classifier",
          "segmentation", "detector")


@dataclass(frozen=True)
class Entry:
    """How to rebuild one published model of one chip."""

    library: str
    """`torchvision`, `timm`, `ultralytics` or `hat` (hat's own plugin families)."""
    constructor: str
    """torchvision / timm model name, ultralytics yaml, or hat builder (`mobilenet_v1`, `fcos_efficientnet`)."""
    family: str
    """Architecture family, the unit of leave-one-family-out validation."""
    group: str
    """Coarse kind: one of `GROUPS`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments."""
    reparameterize: bool = False
    """Re-parameterize (timm `reparameterize_model`) before export, as the board ran it."""
    head: str | None = None
    """Ultralytics: where the graph ends (`detect`, `segment`, `pose`, `classify`, `anchor_detect`)."""
    attention: str = "stock"
    """Ultralytics attention blocks: `stock` softmax, or `decomposed` (the X5 exporter's max/exp/sum/div)."""
    published_params_m: float | None = None
    """Parameter count (millions) the source prints, where it prints one."""
    note: str = ""
    """What is uncertain or worth knowing about this rebuild."""


# --------------------------------------------------------------------------------------------
# Ultralytics YOLO
# --------------------------------------------------------------------------------------------

def _yolo(yaml: str, family: str, group: str, head: str, attention: str = "stock", **kw: Any) -> Entry:
    return Entry("ultralytics", yaml, family, group, head=head, attention=attention, **kw)


def _x5_yolo() -> dict[str, Entry]:
    """The X5 `ultralytics_yolo` table (decomposed attention) and the YOLO26 evaluator table."""
    d = "decomposed"
    out: dict[str, Entry] = {}
    for s in "nsmlx":
        out[f"YOLOv5{s}u"] = _yolo(f"yolov5{s}u.yaml", "yolov5u", "yolo_detect", "detect", d)
        out[f"YOLOv8{s}"] = _yolo(f"yolov8{s}.yaml", "yolov8", "yolo_detect", "detect", d)
        out[f"YOLO11{s}"] = _yolo(f"yolo11{s}.yaml", "yolo11", "yolo_detect", "detect", d)
        out[f"YOLO12{s}"] = _yolo(f"yolo12{s}.yaml", "yolo12", "yolo_detect", "detect", d)
        out[f"YOLOv8{s}-Seg"] = _yolo(f"yolov8{s}-seg.yaml", "yolov8", "yolo_seg", "segment", d)
        out[f"YOLO11{s}-Seg"] = _yolo(f"yolo11{s}-seg.yaml", "yolo11", "yolo_seg", "segment", d)
        out[f"YOLOv8{s}-Pose"] = _yolo(f"yolov8{s}-pose.yaml", "yolov8", "yolo_pose", "pose", d)
        out[f"YOLO11{s}-Pose"] = _yolo(f"yolo11{s}-pose.yaml", "yolo11", "yolo_pose", "pose", d)
        out[f"YOLOv8{s}-CLS"] = _yolo(f"yolov8{s}-cls.yaml", "yolov8", "yolo_cls", "classify", d)
        out[f"YOLO11{s}-CLS"] = _yolo(f"yolo11{s}-cls.yaml", "yolo11", "yolo_cls", "classify", d)
        out[f"YOLO26{s} Detect"] = _yolo(f"yolo26{s}.yaml", "yolo26", "yolo_detect", "detect")
    for s in "tsmce":
        out[f"YOLOv9{s}"] = _yolo(f"yolov9{s}.yaml", "yolov9", "yolo_detect", "detect", d)
    for s in "ce":
        out[f"YOLOv9{s}-Seg"] = _yolo(f"yolov9{s}-seg.yaml", "yolov9", "yolo_seg", "segment", d)
    for s in "nsmblx":
        out[f"YOLOv10{s}"] = _yolo(f"yolov10{s}.yaml", "yolov10", "yolo_detect", "detect", d)
    out["YOLO26n Seg"] = _yolo("yolo26n-seg.yaml", "yolo26", "yolo_seg", "segment")
    out["YOLO26n Pose"] = _yolo("yolo26n-pose.yaml", "yolo26", "yolo_pose", "pose")
    out["YOLO26n Cls"] = _yolo("yolo26n-cls.yaml", "yolo26", "yolo_cls", "classify")
    out.update(_yolov5_v7(("n", "s", "m", "l", "x")))
    out.update(_x5_legacy_demos())
    return out


def _x5_legacy_demos() -> dict[str, Entry]:
    """The older rdk_model_zoo demos/ exports (YOLOv10, YOLOv8-Seg). Their READMEs show what differs
    from the current export: YOLOv10 keeps the stock Softmax attention (the compile log runs
    `/model.10/attn/Softmax` on the BPU) with the same one-to-one NHWC outputs; YOLOv8-Seg has the
    same outputs (mask coefficients, box, cls per level, proto) in another order. Same graphs
    otherwise; the toolchain (OE) version differs."""
    out: dict[str, Entry] = {}
    for s in "nsmblx":
        out[f"YOLOv10{s} (legacy demo)"] = _yolo(f"yolov10{s}.yaml", "yolov10", "yolo_detect", "detect",
                                                 note="legacy demo: stock softmax attention")
    for s in "nsmlx":
        out[f"YOLOv8{s}-seg (legacy demo)"] = _yolo(f"yolov8{s}-seg.yaml", "yolov8", "yolo_seg", "segment",
                                                    note="legacy demo: the same graph as the current export")
    return out


YOLOV5_V7_PARAMS_M = {"n": 1.9, "s": 7.2, "m": 21.2, "l": 46.5, "x": 86.7}
"""Parameter counts of YOLOv5 tag v7.0 as the zoo's YOLOv5 demo prints them."""


def _yolov5_v7(scales: tuple[str, ...]) -> dict[str, Entry]:
    """YOLOv5 tag v7.0: the backbone and neck of ultralytics' `yolov5.yaml` (the same layers as the
    v7.0 repository: 6x6 stem, C3, SPPF, SiLU), without its 1024-channel cap (v7.0 has none: the x
    model reaches 1280), and v7.0's anchor-based Detect: one 1x1 conv of 3 x (80 + 5) = 255 channels
    per level, permuted to NHWC (the zoo's `[1, 80, 80, 255]` outputs)."""
    return {f"YOLOv5{s}_v7.0": _yolo(f"yolov5{s}.yaml", "yolov5", "yolo_detect", "anchor_detect",
                                     kwargs={"max_channels": 4096, "anchors_per_level": 3},
                                     published_params_m=YOLOV5_V7_PARAMS_M[s],
                                     note="v7.0 rebuilt from ultralytics modules; the parameter count checks it")
            for s in scales}


def _s100_yolo() -> dict[str, Entry]:
    """The S100 tables (rdk_model_zoo_s ultralytics_YOLO_{Detect,Seg,Pose}): stock attention."""
    out: dict[str, Entry] = {}
    for s in "nsmlx":
        out[f"YOLOv5{s}u"] = _yolo(f"yolov5{s}u.yaml", "yolov5u", "yolo_detect", "detect")
        out[f"YOLOv8{s}"] = _yolo(f"yolov8{s}.yaml", "yolov8", "yolo_detect", "detect")
        out[f"YOLO11{s}"] = _yolo(f"yolo11{s}.yaml", "yolo11", "yolo_detect", "detect")
        out[f"YOLO12{s}"] = _yolo(f"yolo12{s}.yaml", "yolo12", "yolo_detect", "detect")
        out[f"YOLOv8{s}-Seg"] = _yolo(f"yolov8{s}-seg.yaml", "yolov8", "yolo_seg", "segment")
        out[f"YOLO11{s}-Seg"] = _yolo(f"yolo11{s}-seg.yaml", "yolo11", "yolo_seg", "segment")
        out[f"YOLOv8{s}-Pose"] = _yolo(f"yolov8{s}-pose.yaml", "yolov8", "yolo_pose", "pose")
        out[f"YOLO11{s}-Pose"] = _yolo(f"yolo11{s}-pose.yaml", "yolo11", "yolo_pose", "pose")
    return out


def _x3_yolo() -> dict[str, Entry]:
    """X3 YOLO rows that ultralytics can rebuild."""
    out = _yolov5_v7(("n", "s", "x"))
    note = "X3 demo (throughput only); assumed the same head cut as the X5 demos"
    out["YOLOv8n"] = _yolo("yolov8n.yaml", "yolov8", "yolo_detect", "detect", note=note)
    out["YOLOv10n"] = _yolo("yolov10n.yaml", "yolov10", "yolo_detect", "detect", note=note)
    return out


# --------------------------------------------------------------------------------------------
# Classifiers
# --------------------------------------------------------------------------------------------

def _timm(name: str, family: str, group: str = "cnn_classifier", params: float | None = None,
          reparameterize: bool = False, **kw: Any) -> Entry:
    return Entry("timm", name, family, group, reparameterize=reparameterize, published_params_m=params, **kw)


def _tv(name: str, family: str, params: float | None = None, **kw: Any) -> Entry:
    return Entry("torchvision", name, family, "cnn_classifier", published_params_m=params, **kw)


T = "transformer_classifier"

X5_CLASSIFIERS: dict[str, Entry] = {
    # transformers (attention or token mixers with softmax)
    "EdgeNeXt_base": _timm("edgenext_base", "edgenext", T, 18.51),
    "EdgeNeXt_small": _timm("edgenext_small", "edgenext", T, 5.59),
    "EdgeNeXt_x_small": _timm("edgenext_x_small", "edgenext", T, 2.34),
    "EdgeNeXt_xx_small": _timm("edgenext_xx_small", "edgenext", T, 1.33),
    "EfficientFormer_l3": _timm("efficientformer_l3", "efficientformer", T, 31.3),
    "EfficientFormer_l1": _timm("efficientformer_l1", "efficientformer", T, 12.3),
    "EfficientFormerv2_s2": _timm("efficientformerv2_s2", "efficientformerv2", T, 12.6),
    "EfficientFormerv2_s1": _timm("efficientformerv2_s1", "efficientformerv2", T, 6.12),
    "EfficientFormerv2_s0": _timm("efficientformerv2_s0", "efficientformerv2", T, 3.57),
    "EfficientViT_MSRA_m5": _timm("efficientvit_m5", "efficientvit_msra", T, 12.41),
    "FastViT_SA12": _timm("fastvit_sa12", "fastvit", T, 10.93, True),
    "FastViT_S12": _timm("fastvit_s12", "fastvit", T, 8.86, True),
    "FastViT_T12": _timm("fastvit_t12", "fastvit", T, 6.82, True),
    "FastViT_T8": _timm("fastvit_t8", "fastvit", T, 3.67, True),
    # CNNs
    "ConvNeXt_nano": _timm("convnext_nano", "convnext", params=15.59),
    "ConvNeXt_pico": _timm("convnext_pico", "convnext", params=9.04),
    "ConvNeXt_femto": _timm("convnext_femto", "convnext", params=5.22),
    "ConvNeXt_atto": _timm("convnext_atto", "convnext", params=3.69),
    "Efficientnet_B4": _timm("efficientnet_b4", "efficientnet", params=19.27),
    "Efficientnet_B3": _timm("efficientnet_b3", "efficientnet", params=12.19),
    "Efficientnet_B2": _timm("efficientnet_b2", "efficientnet", params=9.07),
    "FasterNet_S": _timm("fasternet_s", "fasternet", params=31.18),
    "FasterNet_T2": _timm("fasternet_t2", "fasternet", params=15.04),
    "FasterNet_T1": _timm("fasternet_t1", "fasternet", params=7.65),
    "FasterNet_T0": _timm("fasternet_t0", "fasternet", params=3.96),
    "GoogLeNet": _tv("googlenet", "googlenet", 6.81, kwargs={"aux_logits": False, "init_weights": True},
                     note="OE 'Horizon reference' model; torchvision's GoogLeNet (6.62 M) is the nearest public layout"),
    "MobileNetv1": Entry("hat", "mobilenet_v1", "mobilenet_v1", "cnn_classifier", kwargs={"alpha": 0.5},
                         published_params_m=1.33, note="1.33 M = width 0.5 (1.0x is 4.23 M)"),
    "Mobilenetv2": _tv("mobilenet_v2", "mobilenet_v2", 3.44, note="OE 'Horizon reference' model"),
    "Mobilenetv3_large_100": _timm("mobilenetv3_large_100", "mobilenet_v3", params=5.47),
    "Mobilenetv4_conv_medium": _timm("mobilenetv4_conv_medium", "mobilenet_v4", params=9.68),
    "Mobilenetv4_conv_small": _timm("mobilenetv4_conv_small", "mobilenet_v4", params=3.76),
    "MobileOne_S4": _timm("mobileone_s4", "mobileone", params=14.82, reparameterize=True),
    "MobileOne_S3": _timm("mobileone_s3", "mobileone", params=10.19, reparameterize=True),
    "MobileOne_S2": _timm("mobileone_s2", "mobileone", params=7.87, reparameterize=True),
    "MobileOne_S1": _timm("mobileone_s1", "mobileone", params=4.83, reparameterize=True),
    "MobileOne_S0": _timm("mobileone_s0", "mobileone", params=2.15, reparameterize=True),
    "RepGhostNet_200": _timm("repghostnet_200", "repghost", params=9.79, reparameterize=True),
    "RepGhostNet_150": _timm("repghostnet_150", "repghost", params=6.57, reparameterize=True),
    "RepGhostNet_130": _timm("repghostnet_130", "repghost", params=5.48, reparameterize=True),
    "RepGhostNet_111": _timm("repghostnet_111", "repghost", params=4.54, reparameterize=True),
    "RepGhostNet_100": _timm("repghostnet_100", "repghost", params=4.07, reparameterize=True),
    "RepVGG_B1g2": _timm("repvgg_b1g2", "repvgg", params=41.36, reparameterize=True,
                         note="not registered in timm: built from timm's RepVGG-B1 config with groups=2"),
    "RepVGG_B1g4": _timm("repvgg_b1g4", "repvgg", params=36.12, reparameterize=True),
    "RepVGG_B0": _timm("repvgg_b0", "repvgg", params=14.33, reparameterize=True),
    "RepVGG_A2": _timm("repvgg_a2", "repvgg", params=25.49, reparameterize=True),
    "RepVGG_A1": _timm("repvgg_a1", "repvgg", params=12.78, reparameterize=True),
    "RepVGG_A0": _timm("repvgg_a0", "repvgg", params=8.30, reparameterize=True),
    "RepViT_m1_1": _timm("repvit_m1_1", "repvit", params=8.27, reparameterize=True),
    "RepViT_m1_0": _timm("repvit_m1_0", "repvit", params=6.83, reparameterize=True),
    "RepViT_m0_9": _timm("repvit_m0_9", "repvit", params=5.14, reparameterize=True),
    "ResNet18": _tv("resnet18", "resnet", 11.27, note="OE 'Horizon reference' model; torchvision layout"),
    "ResNeXt50_32x4d": _timm("resnext50_32x4d", "resnext", params=24.99),
    "fcos_efficientnetb0": Entry("hat", "fcos_efficientnet", "fcos_efficientnet", "detector",
                                 kwargs={"num_classes": 80},
                                 note="HAT's fcos_efficientnetb0_mscoco = hat's fcos_efficientnet plugin (defaults)"),
}

X3_CLASSIFIERS: dict[str, Entry] = {
    # rdk_x3 demos: bare names; the variant is the one whose parameters / accuracy match
    "GoogLeNet": X5_CLASSIFIERS["GoogLeNet"],
    "Mobilenetv4": replace(X5_CLASSIFIERS["Mobilenetv4_conv_small"], note="3.76 M: mobilenetv4_conv_small"),
    "Mobilenetv2": replace(X5_CLASSIFIERS["Mobilenetv2"], published_params_m=3.4),
    "MobileOne": replace(X5_CLASSIFIERS["MobileOne_S1"], published_params_m=4.8, note="4.8 M: MobileOne-S1"),
    "RepGhost": replace(X5_CLASSIFIERS["RepGhostNet_100"], note="4.07 M, 72.50 top-1: RepGhostNet 1.0x"),
    "RepVGG": replace(X5_CLASSIFIERS["RepVGG_A1"], note="12.78 M, 74.46 top-1: RepVGG-A1"),
    "RepViT": replace(X5_CLASSIFIERS["RepViT_m0_9"], published_params_m=5.1,
                      note="5.1 M: RepViT-M0.9 (formerly named M1)"),
    "ResNet18": replace(X5_CLASSIFIERS["ResNet18"], published_params_m=11.2),
    # X3 toolchain (OE) benchmark table
    "MobileNet-v1": Entry("hat", "mobilenet_v1", "mobilenet_v1", "cnn_classifier", kwargs={"alpha": 1.0},
                          note="OE Caffe MobileNet-v1 1.0x (4.2 M)"),
    "MobileNet-v2": _tv("mobilenet_v2", "mobilenet_v2", note="OE Caffe MobileNet-v2 1.0x"),
    "ResNet50": _tv("resnet50", "resnet", note="torchvision v1.5 layout; if the OE model is the Caffe v1 "
                                                "(stride on the first 1x1) its MACs are ~6% lower"),
    "SE-ResNet50": _timm("legacy_seresnet50", "se_resnet", note="the Caffe SENet layout (stride on the 1x1)"),
    "Inception_v3": _tv("inception_v3", "inception_v3", kwargs={"aux_logits": False, "init_weights": True}),
    "vgg16": _tv("vgg16", "vgg"),
    "fcos (efficientnetb0, OE)": X5_CLASSIFIERS["fcos_efficientnetb0"],
    **{f"efficientnet-lite{i}": _timm(f"tf_efficientnet_lite{i}", "efficientnet_lite") for i in range(5)},
}

S100_CLASSIFIERS: dict[str, Entry] = {
    # rdk_model_zoo_s get_*_onnx.py scripts: timm create_model
    "MobileNetV2": _timm("mobilenetv2_100", "mobilenet_v2"),
    "MobileNetV3 (large?)": _timm("mobilenetv3_large_100", "mobilenet_v3",
                                  note="the export script creates timm mobilenetv3_large_100"),
    "MobileNetV4_conv_medium": _timm("mobilenetv4_conv_medium", "mobilenet_v4"),
    "MobileNetV4_conv_small": _timm("mobilenetv4_conv_small", "mobilenet_v4"),
    "ResNet152": _tv("resnet152", "resnet"),
    "EfficientNet-lite0 (tf_efficientnet_lite0)": _timm("tf_efficientnet_lite0", "efficientnet_lite"),
    **{f"EfficientNet-lite{i}": _timm(f"tf_efficientnet_lite{i}", "efficientnet_lite") for i in range(1, 5)},
}

SIGLIP = {
    "siglip-base-patch16-224": "vit_base_patch16_siglip_224",
    "siglip-base-patch16-384": "vit_base_patch16_siglip_384",
    "siglip-base-patch16-512": "vit_base_patch16_siglip_512",
    "siglip-large-patch16-256": "vit_large_patch16_siglip_256",
    "siglip-large-patch16-384": "vit_large_patch16_siglip_384",
    "siglip-so400m-patch14-224": "vit_so400m_patch14_siglip_224",
    "siglip-so400m-patch14-384": "vit_so400m_patch14_siglip_384",
    "siglip-so400m-patch16-256-i18n": "vit_so400m_patch16_siglip_256",
}
"""HF SigLIP vision towers and the timm models with the same architecture (the i18n so400m is the
same network as the multilingual-trained one; only the weights differ)."""

S100_SIGLIP: dict[str, Entry] = {
    f"{hf} (vision, last_hidden_state)": _timm(name, "siglip", T, kwargs={"tokens_output": True},
                                               note="timm's SigLIP ViT; output = the final-LayerNorm tokens "
                                                    "(HF last_hidden_state), no pooling head")
    for hf, name in SIGLIP.items()
}


J5_HAT_ZOO: dict[str, Entry] = {
    # HAT model zoo (Journey 5, 224x224): HAT's own classifiers, calops 0.57 / 1.81 / 0.39 G
    "MobileNetV1": Entry("hat", "mobilenet_v1", "mobilenet_v1", "cnn_classifier", kwargs={"alpha": 1.0},
                         note="HAT's MobileNetV1 1.0x (0.57 G MACs)"),
    "ResNet18": _tv("resnet18", "resnet", note="HAT's ResNet18: the torchvision layout (1.81 G MACs)"),
    "EfficientNet-B0": _timm("efficientnet_b0", "efficientnet",
                             note="HAT's EfficientNet-B0: the paper's layout as timm builds it (0.39 G MACs)"),
}


def _per_march() -> dict[str, dict[str, Entry]]:
    return {
        "bayes": J5_HAT_ZOO,
        "bayes-e": {**_x5_yolo(), **X5_CLASSIFIERS},
        "bernoulli2": {**_x3_yolo(), **X3_CLASSIFIERS},
        "nash-e": {**_s100_yolo(), **S100_CLASSIFIERS, **S100_SIGLIP},
    }


CATALOGUE: dict[tuple[str, str], Entry] = {(m, name): e for m, entries in _per_march().items()
                                           for name, e in entries.items()}
"""(CSV march, CSV model name) -> how to rebuild it."""


# --------------------------------------------------------------------------------------------
# What is not rebuilt, and why
# --------------------------------------------------------------------------------------------

_V2 = ("YOLOv5 tag v2.0 (Focus, BottleneckCSP, SPP, LeakyReLU): no installable package ships this "
       "configuration (ultralytics and the `yolov5` PyPI package carry only the v6/v7 layout); the "
       "layer table exists only in the tagged ultralytics/yolov5 repository")
_V13 = ("YOLOv13 (iMoonLab, HyperACE / FullPAD blocks): not in ultralytics nor in any package index "
        "package; only the iMoonLab repository has its modules")
_HORIZON = ("a Horizon OE / HAT reference model ('improved' by Horizon): the source gives only name, "
            "input size and latency; its layer configuration is not published in any installable form")

NOT_REBUILT: dict[tuple[str, str], str] = {
    **{("bayes-e", f"YOLOv5{s}_v2.0"): _V2 for s in "smlx"},
    **{("bernoulli2", f"YOLOv5{s}_v2.0"): _V2 for s in "sx"},
    ("bernoulli2", "YOLOv5s-2.0 (Focus+CSP)"): _V2 + " (OE variant at 672x672)",
    **{(m, f"YOLOv13{s}"): _V13 for m in ("bayes-e", "nash-e") for s in "nslx"},
    ("bayes-e", "VargConvNet"): "HAT's VargConvNet: not in timm / torchvision and not among hat's plugins "
                                "(mixvargenet is a different network)",
    ("bayes-e", "fcos_efficientnetb2"): "HAT's fcos_efficientnetb2 (768x768): hat's plugin implements the B0 "
                                        "configuration; the B2 neck / head widths and depths are not published",
    ("bayes-e", "fcos_efficientnetb3"): "HAT's fcos_efficientnetb3 (896x896): as B2, the B3 neck / head "
                                        "configuration is not published",
    ("bernoulli2", "MobileNet_SSD (MobileNetV1)"): "Caffe MobileNet-SSD (VOC, 300x300): the SSD extra layers "
                                                   "and heads are in no installable library (torchvision has "
                                                   "only SSD300-VGG16 and SSDlite-MobileNetV3)",
    ("bernoulli2", "YOLOv3 (Darknet53)"): "original YOLOv3 (LeakyReLU, anchor-based 255-channel heads): "
                                          "ultralytics' yolov3.yaml has SiLU convs and the anchor-free split head",
    ("bernoulli2", "YOLOv4 improved (EfficientNet)"): _HORIZON,
    ("bernoulli2", "EfficientDet (EfficientNet)"): _HORIZON + " (the `effdet` package builds the paper's "
                                                              "EfficientDet; the OE's BPU variant differs "
                                                              "in ways the source does not give)",
    ("bernoulli2", "EfficientDet no-dequant (EfficientNet)"): _HORIZON,
    ("bernoulli2", "CenterNet (ResNet50)"): "CenterNet-ResNet50 of the OE: the deconv / DCN layout of the upsampling "
                                            "neck is not stated and no installable package builds it",
    ("bernoulli2", "FCOS improved (EfficientNet)"): _HORIZON + " (not HAT's fcos_efficientnetb0: a different "
                                                               "row lists that one)",
    ("bernoulli2", "UNet (MobileNet)"): "OE UNet-MobileNet (1024x2048): decoder layout not published and no "
                                        "installable package builds it",
    ("bernoulli2", "UNet improved (EfficientNet)"): _HORIZON,
    ("bernoulli2", "DeepLabV3+ improved (EfficientNet)"): _HORIZON,
}


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

def _number(text: str) -> int | float | str | None:
    text = text.strip()
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def load_rows(csv_path: str | Path = DEFAULT_CSV) -> list[dict[str, Any]]:
    """The CSV rows with typed numbers: input_h / input_w / batch as int, latency_ms / fps as
    float or None (empty), threads as int where it is a number (else the text, e.g. `max`)."""
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            typed: dict[str, Any] = dict(row)
            for key in ("input_h", "input_w", "batch"):
                typed[key] = int(row[key])
            for key in ("latency_ms", "fps"):
                value = _number(row[key])
                typed[key] = float(value) if isinstance(value, (int, float)) else None
            typed["threads"] = _number(row["threads"])
            rows.append(typed)
    return rows


def load_hat_zoo_rows(md_path: str | Path = HAT_ZOO_MD) -> list[dict[str, Any]]:
    """The HAT model zoo's Journey 5 latencies as table rows (march `bayes`, 224x224, batch 1,
    kind `hat_zoo_bpu_latency`): every line of its markdown table whose last column is a number.
    [] when the file is absent."""
    path = Path(md_path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not line.lstrip().startswith("|"):
            continue
        latency = _number(cells[-1])
        if not isinstance(latency, (int, float)):
            continue
        rows.append({"march": "bayes", "model": cells[0], "input_h": 224, "input_w": 224, "batch": 1,
                     "threads": 1, "kind": "hat_zoo_bpu_latency", "latency_ms": float(latency), "fps": None,
                     "source": f"{path.name} (HAT model zoo, Journey 5)"})
    return rows


def load_all_rows(csv_path: str | Path = DEFAULT_CSV, md_path: str | Path = HAT_ZOO_MD) -> list[dict[str, Any]]:
    """The CSV's rows and the HAT model zoo's Journey 5 rows (`load_hat_zoo_rows`)."""
    return load_rows(csv_path) + load_hat_zoo_rows(md_path)


def published_models(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, int]]:
    """Every distinct (march, model) of the table and its input (h, w) (one size per model)."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for row in rows:
        key = (row["march"], row["model"])
        size = (row["input_h"], row["input_w"])
        if out.setdefault(key, size) != size:
            raise ValueError(f"{key} is published at two input sizes: {out[key]} and {size}")
    return out


def coverage(csv_path: str | Path = DEFAULT_CSV) -> dict[str, Any]:
    """Check that every (march, model) of the table is in `CATALOGUE` or `NOT_REBUILT` (never
    both, and neither holds a model the table lacks); return counts per march. Raises
    `AssertionError` naming what is missing or extra."""
    rows = load_all_rows(csv_path, Path(csv_path).parent / HAT_ZOO_MD.name)
    published = published_models(rows)
    keys = set(published)
    missing = sorted(keys - set(CATALOGUE) - set(NOT_REBUILT))
    both = sorted(set(CATALOGUE) & set(NOT_REBUILT))
    extra = sorted((set(CATALOGUE) | set(NOT_REBUILT)) - keys)
    assert not missing, f"published but neither rebuilt nor explained: {missing}"
    assert not both, f"both rebuilt and NOT_REBUILT: {both}"
    assert not extra, f"catalogued but not in the table: {extra}"
    per_march = {}
    for march in sorted({m for m, _ in keys}):
        rebuilt = [k for k in CATALOGUE if k[0] == march]
        per_march[march] = {"published": sum(1 for k in keys if k[0] == march), "rebuilt": len(rebuilt),
                            "not_rebuilt": sum(1 for k in NOT_REBUILT if k[0] == march)}
    return {"per_march": per_march, "rebuilt": len(CATALOGUE), "not_rebuilt": len(NOT_REBUILT),
            "rows_rebuilt": sum(1 for r in rows if (r["march"], r["model"]) in CATALOGUE), "rows": len(rows)}


def safe_name(model_name: str) -> str:
    """A file-name-safe form of a published model name (`YOLO26n Detect` -> `YOLO26n_Detect`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_")


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

def build(march: str, model_name: str, input_hw: tuple[int, int]) -> Any:
    """The network of (march, model_name) as an eval-mode `torch.nn.Module` with random weights,
    re-parameterized where the board ran it so, ending where the published graph ends.
    `input_hw` is the (H, W) of the CSV row (the SigLIP towers size their position embeddings
    by it; the other networks take any size). Raises KeyError for a model not in `CATALOGUE`."""
    entry = CATALOGUE[(march, model_name)]
    builder = {"torchvision": _build_torchvision, "timm": _build_timm, "ultralytics": _build_ultralytics,
               "hat": _build_hat}[entry.library]
    return builder(entry, tuple(input_hw)).eval()


def build_info(module: Any) -> dict[str, Any]:
    """Parameter count of a built network (millions, as the sources print them)."""
    return {"params_m": round(sum(p.numel() for p in module.parameters()) / 1e6, 3)}


def _build_torchvision(entry: Entry, input_hw: tuple[int, int]) -> Any:
    import torchvision

    return getattr(torchvision.models, entry.constructor)(weights=None, **entry.kwargs)


def _build_timm(entry: Entry, input_hw: tuple[int, int]) -> Any:
    import timm
    from timm.utils.model import reparameterize_model

    kwargs = dict(entry.kwargs)
    tokens_only = kwargs.pop("tokens_output", False)
    if entry.constructor == "repvgg_b1g2":
        model = _repvgg_b1g2()
    elif tokens_only:
        model = timm.create_model(entry.constructor, pretrained=False, num_classes=0, img_size=input_hw, **kwargs)
    else:
        model = timm.create_model(entry.constructor, pretrained=False, **kwargs)
    model.eval()
    if entry.reparameterize:
        model = reparameterize_model(model)
    return _token_output(model) if tokens_only else model


def _token_output(model: Any) -> Any:
    """A ViT returning its final-norm token sequence (HF `last_hidden_state`), no pooling head."""
    from torch import nn

    class Tokens(nn.Module):
        def __init__(self, vit: nn.Module) -> None:
            super().__init__()
            vit.reset_classifier(0, global_pool="")
            self.vit = vit
            if getattr(vit, "attn_pool", None) is not None:
                vit.attn_pool = None  # the MAP head is not part of last_hidden_state

        def forward(self, x):
            return self.vit.forward_features(x)

    return Tokens(model)


def _repvgg_b1g2() -> Any:
    """RepVGG-B1g2: timm's RepVGG-B1 config with grouped (2) convs in every second block, as
    timm builds its B1g4 (not registered in timm)."""
    from timm.models.byobnet import ByobNet, ByoModelCfg, _rep_vgg_bcfg, model_cfgs

    base: ByoModelCfg = model_cfgs["repvgg_b1g4"]
    cfg = replace(base, blocks=_rep_vgg_bcfg(d=(4, 6, 16, 1), wf=(2., 2., 2., 4.), groups=2))
    return ByobNet(cfg)


def _build_hat(entry: Entry, input_hw: tuple[int, int]) -> Any:
    if entry.constructor == "mobilenet_v1":
        from hat_mobilenet.model import MobileNetV1

        return MobileNetV1(num_classes=1000, **entry.kwargs)
    if entry.constructor == "fcos_efficientnet":
        from hat_fcos_efficientnet.model import FcosEfficientNet

        return FcosEfficientNet(**entry.kwargs).eval().deploy_copy()
    raise KeyError(f"unknown hat builder {entry.constructor}")


def _build_ultralytics(entry: Entry, input_hw: tuple[int, int]) -> Any:
    from bpu_yolo import build_yolo

    return build_yolo(entry.constructor, entry.head, entry.attention, **entry.kwargs)
