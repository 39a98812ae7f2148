"""The `timm` family object: any classifier of timm's registry, by name, built untrained."""

from __future__ import annotations

from typing import ClassVar

import torch

from hatcli.tasks.library_models import ArchLibrary, LibraryArchConfig, LibraryFamily
import hat_timm.arch
from hat_timm.arch import require_timm

REPARAMETERIZE = ("fuse", "reparameterize", "switch_to_deploy")
"""Methods by which timm's re-parameterizable blocks (RepVGG, MobileOne, FastViT, ...) fold their
training-time branches; `timm.utils.reparameterize_model` calls them."""


class TimmConfig(LibraryArchConfig):
    """`[model]` table of `timm`: an arch of timm's registry and its constructor's keyword arguments.

    `arch` is a name from `timm.list_models()` (e.g. `mobilenetv3_small_050`, `regnetx_002`,
    `repvgg_a0`); `timm.create_model(arch, pretrained=False, num_classes=N, **options)` builds it.
    `options` are keyword arguments of the arch's constructor, as timm names them (`drop_rate`,
    `drop_path_rate`, `act_layer`, ...). `num_classes`, `img_size`, `in_chans`, `pretrained` and
    the other download or layer-config keys are hat's to set and refused there. `build_kwargs()`
    adds `img_size` for archs of a fixed input size when the recipe's input is not the arch's own.
    """

    library: ClassVar[ArchLibrary] = hat_timm.arch


class TimmFamily(LibraryFamily):
    """Any timm classifier by name (`[model] arch`), with its own constructor's options: built by
    `timm.create_model(arch, pretrained=False, num_classes=num_classes, exportable=True, **options)`,
    untrained (hat never downloads weights), with export-friendly layers."""

    name: ClassVar[str] = "timm"
    config_class: ClassVar[type[LibraryArchConfig]] = TimmConfig
    description: ClassVar[str] = ("any timm classifier by name (`arch` from timm.list_models(), `options` its "
                                  "constructor's keywords), built untrained; needs `pip install timm`")
    tiny_arch: ClassVar[str] = "resnet10t"
    """timm's ResNet-10-T (3-layer stem, one BasicBlock per stage), which builds, quantizes and
    compiles in seconds at 32x32."""

    def build_deploy_model(self, float_model: torch.nn.Module) -> torch.nn.Module:
        """The float model with timm's re-parameterizable blocks folded for inference
        (`timm.utils.reparameterize_model` on a copy: RepVGG's 3x3 + 1x1 + identity branches become
        one 3x3 conv, MobileOne's and FastViT's likewise); other models are returned as they are."""
        if not any(hasattr(m, name) for m in float_model.modules() for name in REPARAMETERIZE):
            return float_model
        from timm.utils.model import reparameterize_model

        require_timm()
        return reparameterize_model(float_model, inplace=False)
