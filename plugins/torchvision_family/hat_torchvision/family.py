"""The `torchvision` family object: any classifier of torchvision.models, by name, built untrained."""

from __future__ import annotations

from typing import ClassVar

from hatcli.tasks.library_models import ArchLibrary, LibraryArchConfig, LibraryFamily
import hat_torchvision.arch


class TorchvisionConfig(LibraryArchConfig):
    """`[model]` table of `torchvision`: a classification arch of torchvision.models and its builder's keyword arguments.

    `arch` is a name from `torchvision.models.list_models(module=torchvision.models)` (e.g.
    `mobilenet_v2`, `resnet18`, `regnet_x_400mf`); `torchvision.models.get_model(arch, weights=None,
    num_classes=N, **options)` builds it. `options` are keyword arguments of the arch's builder, as
    torchvision names them (`width_mult`, `dropout`, `stochastic_depth_prob`, ...). `num_classes`,
    `weights`, `progress`, `image_size`, `input_size` and `aux_logits` are hat's to set and refused
    there. `build_kwargs()` adds `aux_logits=False` and the input size for the archs whose class
    takes them.
    """

    library: ClassVar[ArchLibrary] = hat_torchvision.arch


class TorchvisionFamily(LibraryFamily):
    """Any torchvision classifier by name (`[model] arch`), with its own builder's options: built by
    `torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **options)`, untrained
    (hat never downloads weights)."""

    name: ClassVar[str] = "torchvision"
    config_class: ClassVar[type[LibraryArchConfig]] = TorchvisionConfig
    description: ClassVar[str] = ("any torchvision classifier by name (`arch` from torchvision.models.list_models(), "
                                  "`options` its builder's keywords), built untrained")
    tiny_arch: ClassVar[str] = "resnet18"
    """torchvision's ResNet-18, which builds, quantizes and compiles in seconds at 32x32."""
