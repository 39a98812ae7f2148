"""Every registered model family, whoever installed it, goes through every stage on tiny inputs:
build, forward, one training step, decode, calibrate, convert, export and compile, and the
compiled artifact computes what the integer program computes.

The tests are parametrized over the registry, so a family is tested the day it is installed
(timm's habit), whichever distribution installed it. Each runs at the family's `min_input_size`
with its `tiny_config()`. A plugin that fails to load registers no family and so would escape
these tests: that every installed plugin loads is a test of its own.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from hatcli.plugins import families, plugin_infos

NAMES = families().names()
NUM_CLASSES = 3


def test_the_bundled_families_are_registered_by_their_plugins() -> None:
    owners = {name: families().owner(name) for name in NAMES}
    assert {"mobilenet_v1", "mixvargenet", "fcos_efficientnet_b0"} <= set(owners)
    loaded = {info.name for info in plugin_infos() if info.status == "ok"}
    assert {owners["mobilenet_v1"], owners["mixvargenet"], owners["fcos_efficientnet_b0"]} <= loaded


def test_every_installed_plugin_loads_so_every_installed_family_is_tested() -> None:
    broken = [f"{info.name} ({info.distribution}): {info.error}" for info in plugin_infos() if info.status != "ok"]
    assert broken == []


def test_the_tests_run_over_every_registered_family() -> None:
    assert NAMES == families().names() and NAMES


def _batch(family, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, *family.min_input_size, generator=generator)


def _targets(family, batch: int) -> object:
    """Labels (classification), one box per image (detection) or a mask with an ignored border
    (segmentation), made up for one training step."""
    if family.task == "classification":
        return torch.arange(batch) % NUM_CLASSES
    h, w = family.min_input_size
    if family.task == "segmentation":
        masks = [(torch.arange(h * w).reshape(h, w) + i) % NUM_CLASSES for i in range(batch)]
        for mask in masks:
            mask[0] = 255
        return [{"mask": mask.to(torch.uint8), "img_size": (h, w)} for mask in masks]
    return [{"boxes": torch.tensor([[w * 0.2, h * 0.25, w * 0.7, h * 0.8]]), "labels": torch.tensor([i % NUM_CLASSES]),
             "img_size": (h, w)} for i in range(batch)]


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    """(family, config, float model) of one registered family."""
    family = families().get(request.param)
    torch.manual_seed(0)
    config = family.tiny_config()
    return family, config, family.build_float_model(config, NUM_CLASSES)


def test_forward_train_step_and_decode(built) -> None:
    family, config, model = built
    model.train()
    x = _batch(family)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = family.loss(model(x), _targets(family, len(x)), config=config)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = model(x)
    names = list(family.output_names)
    flat = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    assert len(flat) == len(names) and all(torch.isfinite(t).all() for t in flat)
    predictions = family.predict(outputs, config=config)
    assert len(predictions) == len(x)


def test_calibrate_convert_export_and_compile(built, tmp_path: Path) -> None:
    from hatcli.deploy.check import check_model
    from hatcli.deploy.compile import compile_model
    from hatcli.deploy.export import export_onnx
    from hatcli.deploy.runtime import load_artifact
    from hatcli.workflows.compare import broadcast_step, flat_outputs, output_steps
    from hatcli.quant.flow import convert_to_integer, export_program, prepare_quantized, set_mode
    from hatcli.quant.integer import integer_program
    from hatcli.quant.march import load_march

    family, config, model = built
    march = load_march("nash_e")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared, quantizer = prepare_quantized(family, model.eval(), family.min_input_size, march,
                                                family.int16_outputs(config))
    assert quantizer.unquantized == [], "every op of a bundled family's deploy graph is quantized"
    set_mode(prepared, "calibrate")
    with torch.no_grad():
        prepared(_batch(family, 4))
    reference = convert_to_integer(prepared)
    example = family.example_inputs(family.min_input_size, batch=2)
    onnx_path = tmp_path / "model.onnx"
    names = list(family.output_names)
    export_onnx(export_program(reference, example), example, onnx_path, names)
    assert check_model(onnx_path, march).supported
    compile_model(onnx_path, march, 3, tmp_path / "compiled", {"shape": ["N", 3, *family.min_input_size]}, measure=False)
    artifact = load_artifact(tmp_path / "compiled")
    assert artifact.output_names == names

    x = _batch(family, 3)
    with torch.no_grad():
        ours = flat_outputs(integer_program(reference)(x))
    deployed = [torch.from_numpy(a) for a in artifact.run(x.numpy())]
    steps = output_steps(onnx_path)
    for index, (a, b) in enumerate(zip(ours, deployed)):
        diff = (a.double() - b.double()).abs()
        assert steps[index] is not None, f"output {names[index]} has no quantization step"
        within = float((diff / broadcast_step(steps[index], diff)).max())
        assert within <= 1.0, f"{names[index]} differs by {within:.2f} output steps"
