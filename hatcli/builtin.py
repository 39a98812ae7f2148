"""The built-in plugin: what hat provides itself, registered through the same hooks as others."""

from __future__ import annotations

from collections.abc import Callable

from hatcli.family import CallbackSpec, Packer, PackRequest, PackResult
from hatcli.hookspecs import hookimpl


def _pack_shapes(request: PackRequest) -> PackResult:
    from hatcli.data.shapes import pack_shapes

    return pack_shapes(request)


def _pack_imagenet(request: PackRequest) -> PackResult:
    from hatcli.data.packers import imagenet

    return imagenet.run(request)


def _pack_coco(request: PackRequest) -> PackResult:
    from hatcli.data.packers import coco

    return coco.run(request)


def _pack_mnist(request: PackRequest) -> PackResult:
    from hatcli.data.packers import mnist

    return mnist.run(request)


@hookimpl
def register_packers(register: Callable[[Packer], None]) -> None:
    """Register the packers that ship with hat."""
    for name, description, run in (
        ("shapes", "generate a deterministic synthetic dataset (coloured shapes) and pack it", _pack_shapes),
        ("imagenet", "a class-per-folder image tree: SRC/<split>/<class>/<image> (ImageNet or your own)",
         _pack_imagenet),
        ("coco", "COCO-format detection: SRC/annotations/instances_<split>2017.json + SRC/<split>2017/",
         _pack_coco),
        ("mnist", "MNIST or Fashion-MNIST idx files: SRC/{train,t10k}-{images,labels}-idx*-ubyte.gz", _pack_mnist),
    ):
        register(Packer(name=name, description=description, run=run))


def _early_stopping(**args: object) -> object:
    from hatcli.engine.callbacks import EarlyStopping

    return EarlyStopping(**args)  # type: ignore[arg-type]


@hookimpl
def register_callbacks(register: Callable[[CallbackSpec], None]) -> None:
    """Register the training callbacks that ship with hat (besides the always-on ones)."""
    register(CallbackSpec(
        name="early_stopping",
        description="stop when the validation metric has not improved for `patience` validations",
        factory=_early_stopping,
    ))
