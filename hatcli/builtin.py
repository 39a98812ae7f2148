"""The built-in plugin: what hat provides itself, registered through the same hooks as others.

Like any plugin it sits at the top of the import graph: the plugin manager loads it by its module
name (`hatcli.plugins.BUILTIN_MODULE`), and no module of hat imports it, so it may import any layer.
"""

from __future__ import annotations

from collections.abc import Callable

from hatcli.data.packers import cityscapes, coco, imagenet, mnist, voc
from hatcli.data.shapes import pack_shapes
from hatcli.deploy.runtime import ONNXRUNTIME
from hatcli.engine.callbacks import EarlyStopping
from hatcli.family import CallbackSpec, Packer, QuantSchemeSpec
from hatcli.hookspecs import hookimpl
from hatcli.march_profile import MarchProfile, read_march_file
from hatcli.quant.low_bit.schemes import BUILTIN_SCHEMES
from hatcli.quant.march import SHIPPED_MARCHES, shipped_march_file
from hatcli.runtime_spec import RuntimeSpec


@hookimpl
def register_packers(register: Callable[[Packer], None]) -> None:
    """Register the packers that ship with hat."""
    for name, description, run in (
        ("shapes", "generate a deterministic synthetic dataset (coloured shapes) and pack it", pack_shapes),
        ("imagenet", "a class-per-folder image tree: SRC/<split>/<class>/<image> (ImageNet or your own)",
         imagenet.run),
        ("coco", "COCO-format detection: SRC/annotations/instances_<split>2017.json + SRC/<split>2017/",
         coco.run),
        ("voc", "Pascal VOC: SRC/{JPEGImages,Annotations,ImageSets/Main,SegmentationClass}; --task detection "
         "(the default) or segmentation", voc.run),
        ("cityscapes", "Cityscapes semantic segmentation: SRC/leftImg8bit/<split>/<city>/*_leftImg8bit.png + "
         "SRC/gtFine/<split>/<city>/*_gtFine_labelIds.png -> 19 classes", cityscapes.run),
        ("mnist", "MNIST or Fashion-MNIST idx files: SRC/{train,t10k}-{images,labels}-idx*-ubyte.gz", mnist.run),
    ):
        register(Packer(name=name, description=description, run=run))


@hookimpl
def register_callbacks(register: Callable[[CallbackSpec], None]) -> None:
    """Register the training callbacks that ship with hat (besides the always-on ones)."""
    register(CallbackSpec(
        name="early_stopping",
        description="stop when the validation metric has not improved for `patience` validations",
        factory=EarlyStopping,
    ))


@hookimpl
def register_quant_schemes(register: Callable[[QuantSchemeSpec], None]) -> None:
    """Register the march's default scheme and the low-bit schemes that ship with hat."""
    for spec in BUILTIN_SCHEMES:
        register(spec)


@hookimpl
def register_marches(register: Callable[[MarchProfile], None]) -> None:
    """Register the march profiles that ship with hat (`hatcli/quant/marches/*.toml`)."""
    for name in SHIPPED_MARCHES:
        register(read_march_file(shipped_march_file(name), what=f"hatcli/quant/marches/{name}.toml"))


@hookimpl
def register_runtimes(register: Callable[[RuntimeSpec], None]) -> None:
    """Register ONNX Runtime, the runtime hat's artifacts are proven exact on."""
    register(ONNXRUNTIME)
