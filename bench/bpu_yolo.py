"""Ultralytics YOLO graphs as the RDK model zoo exports them: built from the bundled yaml (no
weights) and cut at the head convolutions, before box decoding.

Used by `bench/bpu_catalogue.py`. What the zoo's exporters do (samples/vision/ultralytics_yolo/
conversion/export_monkey_patch.py, and the yolo26 exporters): the head ends at the last convolution
of every branch, each output permuted to NHWC - per level (cls, box), plus mask coefficients and
the proto map for segmentation, plus keypoints for pose; YOLOv10 and YOLO26 use the one-to-one
branch; the classifier ends at the linear layer (no softmax; YOLO26: the linear as a 1x1 conv,
NHWC). The X5 exporter also rewrites the attention of `Attention` (C2PSA / PSA) and `AAttn`
(YOLO12) with an explicit max / exp / sum / divide softmax over the key axis moved to dim 1
(`attention="decomposed"`). ultralytics and torch are imported inside the functions.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


def build_yolo(yaml: str, head: str, attention: str = "stock", max_channels: int | None = None,
               anchors_per_level: int = 3) -> Any:
    """An ultralytics model built from its bundled `yaml` (no weights), returning the raw outputs
    of its head convolutions in NHWC (see the module docstring). `head`: `detect`, `segment`,
    `pose`, `classify`, or `anchor_detect` (YOLOv5 v7.0's 1x1 convs, `anchors_per_level` x 85
    channels). `attention="decomposed"` rewrites the attention blocks' softmax as the X5 exporter
    does. `max_channels` overrides the yaml's channel cap."""
    import os

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel, PoseModel, SegmentationModel
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load(yaml)
    if max_channels is not None:
        scale = cfg["scale"]
        cfg["scales"][scale] = [*cfg["scales"][scale][:2], max_channels]
    kind = {"detect": DetectionModel, "anchor_detect": DetectionModel, "segment": SegmentationModel,
            "pose": PoseModel, "classify": ClassificationModel}[head]
    model = kind(cfg, verbose=False).eval()
    layers = list(model.model)
    cut = _head_cut(layers[-1], head, anchors_per_level, yolo26=Path(yaml).name.startswith("yolo26"))
    graph = _YoloGraph(layers[:-1], set(model.save), cut, layers[-1].f)
    if attention == "decomposed":
        _decompose_attention(graph)
    elif attention != "stock":
        raise ValueError(f"attention must be `stock` or `decomposed`, not {attention!r}")
    return graph.eval()


def _nn():
    import torch
    from torch import nn

    return torch, nn


def _head_cut(head: Any, kind: str, anchors_per_level: int, yolo26: bool = False) -> Any:
    """The module that replaces an ultralytics head: the branches the board graph ends with."""
    torch, nn = _nn()
    if kind == "classify":
        return _ClassifyCut(head, conv_linear=yolo26)
    if kind == "anchor_detect":
        chans = [seq[0].conv.in_channels for seq in head.cv2]
        no = anchors_per_level * (head.nc + 5)
        return _BranchCut([nn.ModuleList(nn.Conv2d(c, no, 1) for c in chans)], proto=None)
    e2e = getattr(head, "one2one_cv2", None) is not None
    pick = (lambda n: getattr(head, f"one2one_{n}")) if e2e else (lambda n: getattr(head, n))
    branches = [pick("cv3"), pick("cv2")]  # cls, box (the zoo's order)
    proto = None
    if kind == "segment":
        branches.append(pick("cv4"))  # mask coefficients
        proto = head.proto
        if getattr(proto, "semseg", None) is not None:
            proto.semseg = nn.Identity()  # Proto26's training-only semantic branch: not in the graph
    elif kind == "pose":
        if getattr(head, "cv4_kpts", None) is not None:  # Pose26: shared tower, then the keypoint conv
            branches.append(nn.ModuleList(nn.Sequential(f, k) for f, k in zip(pick("cv4"), pick("cv4_kpts"))))
        else:
            branches.append(pick("cv4"))
    return _BranchCut(branches, proto=proto, proto_all_levels=type(proto).__name__ == "Proto26")


@functools.lru_cache(maxsize=None)
def _yolo_modules():
    torch, nn = _nn()

    class YoloGraph(nn.Module):
        """The ultralytics layers before the head, then the head cut."""

        def __init__(self, layers, save, cut, head_from) -> None:
            super().__init__()
            self.layers = nn.ModuleList(layers)
            self.save = sorted(save)
            self.cut = cut
            self.head_from = head_from

        def forward(self, x):
            y = []
            for m in self.layers:
                if m.f != -1:
                    x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
                x = m(x)
                y.append(x if m.i in self.save else None)
            f = self.head_from
            if isinstance(f, int):
                feats = x if f == -1 else y[f]
            else:
                feats = [x if j == -1 else y[j] for j in f]
            return self.cut(feats)

    class BranchCut(nn.Module):
        """Per level, every branch's last conv output in NHWC; then the proto map, if any."""

        def __init__(self, branches, proto=None, proto_all_levels: bool = False) -> None:
            super().__init__()
            self.branches = nn.ModuleList(branches)
            self.proto = proto
            self.proto_all_levels = proto_all_levels

        def forward(self, x):
            outs = []
            for i in range(len(x)):
                for branch in self.branches:
                    outs.append(branch[i](x[i]).permute(0, 2, 3, 1))
            if self.proto is not None:
                p = self.proto(x if self.proto_all_levels else x[0])
                if isinstance(p, tuple):  # Proto26 in training mode (BatchNorm statistics): (proto, semantic)
                    p = p[0]
                outs.append(p.permute(0, 2, 3, 1))
            return tuple(outs)

    class ClassifyCut(nn.Module):
        """conv -> pool -> linear logits (no softmax); YOLO26: the linear as a 1x1 conv, NHWC out."""

        def __init__(self, head, conv_linear: bool) -> None:
            super().__init__()
            self.conv, self.pool = head.conv, head.pool
            self.conv_linear = conv_linear
            lin = head.linear
            if conv_linear:
                conv = nn.Conv2d(lin.in_features, lin.out_features, 1)
                with torch.no_grad():
                    conv.weight.copy_(lin.weight.view(*lin.weight.shape, 1, 1))
                    conv.bias.copy_(lin.bias)
                self.linear = conv
            else:
                self.linear = lin

        def forward(self, x):
            if isinstance(x, list):
                x = torch.cat(x, 1)
            x = self.pool(self.conv(x))
            if self.conv_linear:
                return self.linear(x).permute(0, 2, 3, 1)
            return self.linear(x.flatten(1))

    return YoloGraph, BranchCut, ClassifyCut


def _YoloGraph(*args: Any) -> Any:
    return _yolo_modules()[0](*args)


def _BranchCut(*args: Any, **kw: Any) -> Any:
    return _yolo_modules()[1](*args, **kw)


def _ClassifyCut(*args: Any, **kw: Any) -> Any:
    return _yolo_modules()[2](*args, **kw)


def bpu_softmax(scores: Any) -> Any:
    """Softmax over the last axis, computed as the X5 exporter does: the axis moved to dim 1 (the
    channel axis of the BPU layout), exp(x - max) / sum, and moved back."""
    torch, _ = _nn()
    n = scores.dim()
    order = (0, n - 1, *range(1, n - 1))
    back = [order.index(i) for i in range(n)]
    t = scores.permute(order)
    e = torch.exp(t - t.amax(dim=1, keepdim=True))
    return (e / e.sum(dim=1, keepdim=True)).permute(back)


def _attention_forward(self: Any, x: Any) -> Any:
    """ultralytics `Attention` (C2PSA / PSA) with `bpu_softmax`."""
    B, C, H, W = x.shape
    N = H * W
    q, k, v = self.qkv(x).view(B, self.num_heads, self.key_dim * 2 + self.head_dim, N).split(
        [self.key_dim, self.key_dim, self.head_dim], dim=2)
    attn = bpu_softmax((q * self.scale).transpose(-2, -1) @ k)
    x = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
    return self.proj(x)


def _area_attention_forward(self: Any, x: Any) -> Any:
    """ultralytics `AAttn` (YOLO12 area attention) with `bpu_softmax`."""
    B, _, H, W = x.shape
    N = H * W
    qkv = self.qkv(x).flatten(2).transpose(1, 2)
    if self.area > 1:
        qkv = qkv.reshape(B * self.area, N // self.area, self.all_head_dim * 3)
        B, N, _ = qkv.shape
    q, k, v = (qkv.view(B, N, self.num_heads, self.head_dim * 3).permute(0, 2, 3, 1)
               .split([self.head_dim, self.head_dim, self.head_dim], dim=2))
    attn = bpu_softmax((q * (self.head_dim ** -0.5)).transpose(-2, -1) @ k)
    x = (v @ attn.transpose(-2, -1)).permute(0, 3, 1, 2)
    v = v.permute(0, 3, 1, 2)
    if self.area > 1:
        x = x.reshape(B // self.area, N * self.area, self.all_head_dim)
        v = v.reshape(B // self.area, N * self.area, self.all_head_dim)
        B, N, _ = x.shape
    x = x.reshape(B, H, W, self.all_head_dim).permute(0, 3, 1, 2)
    v = v.reshape(B, H, W, self.all_head_dim).permute(0, 3, 1, 2)
    return self.proj(x + self.pe(v))


def _decompose_attention(model: Any) -> int:
    """Give every ultralytics `Attention` / `AAttn` of `model` the decomposed-softmax forward; the
    number rewritten."""
    import types

    from ultralytics.nn.modules.block import AAttn, Attention

    count = 0
    for m in model.modules():
        if type(m) is Attention:
            m.forward = types.MethodType(_attention_forward, m)
            count += 1
        elif type(m) is AAttn:
            m.forward = types.MethodType(_area_attention_forward, m)
            count += 1
    return count
