"""The `openvino` runtime: registered whether or not OpenVINO is installed (then asking for it says
how to install it), reading the artifact's QDQ model (OpenVINO cannot read hat's lowered integer
graph), float parts in f32, the thread count it is given, and outputs close to ONNX Runtime's on
the same artifact (OpenVINO's int8 arithmetic is its own, so close, not equal)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hat_openvino.runtime import INSTALL, OPENVINO, openvino_missing
from hatcli.deploy.runtime import load_artifact
from hatcli.errors import ArtifactError, UsageError
from hatcli.plugins import runtimes


class _Net(nn.Module):
    """conv-bn-relu, depthwise, pointwise, residual add, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.pw(self.dw(x) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _Family:
    """What `prepare_quantized` needs from a family, for a network built here."""

    name = "test"

    def build_deploy_model(self, model: nn.Module) -> nn.Module:
        return model

    def example_inputs(self, input_size: tuple[int, int], batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 3, *input_size),)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An int8 artifact for `host`, through hat's own quantize -> export -> compile functions."""
    from hatcli.deploy.compile import compile_model
    from hatcli.deploy.export import export_onnx
    from hatcli.quant.flow import convert_to_integer, export_program, prepare_quantized, set_mode
    from hatcli.quant.march import load_march

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ov")
    model, size = _Net().eval(), (32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared, _ = prepare_quantized(_Family(), model, size, load_march("host"), [])
        set_mode(prepared, "calibrate")
        with torch.no_grad():
            for seed in range(4):
                prepared(torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(seed)))
        example = _Family().example_inputs(size)
        program = export_program(convert_to_integer(prepared), example)
    export_onnx(program, example, folder / "qdq.onnx", ["output"])
    spec = {"name": "image", "shape": [1, 3, *size], "dtype": "float32", "layout": "NCHW"}
    return compile_model(folder / "qdq.onnx", load_march("host"), 3, folder / "artifact", spec, measure=False)


def test_the_plugin_registers_openvino_as_a_qdq_reading_runtime_that_is_not_exact() -> None:
    spec = runtimes().get("openvino")
    assert spec is OPENVINO and spec.form == "qdq" and not spec.exact


def test_without_openvino_the_runtime_says_how_to_install_it(artifact: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert openvino_missing() == INSTALL and "pip install openvino" in INSTALL
    with pytest.raises(UsageError, match="runtime `openvino` is not installed here: pip install openvino"):
        load_artifact(artifact, runtime="openvino")


needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="OpenVINO is not installed (pip install openvino)")


@needs_openvino
def test_compile_records_that_openvino_runs_the_artifacts_qdq_model(artifact: Path) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["runtimes"]["openvino"] == {"model": "model_qdq.onnx", "exact": False, "status": "ok"}


@needs_openvino
def test_the_artifact_runs_on_openvino_with_f32_float_parts_and_the_threads_asked_for(artifact: Path) -> None:
    loaded = load_artifact(artifact, threads=1, runtime="openvino")
    assert loaded.runtime == "openvino" and loaded.model_path == artifact / "model_qdq.onnx"
    compiled = loaded.session.compiled
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32", "float32")


@needs_openvino
def test_openvino_agrees_with_onnx_runtime_on_the_same_artifact_to_a_few_output_steps(artifact: Path) -> None:
    on_ov, on_ort = load_artifact(artifact, runtime="openvino"), load_artifact(artifact)
    x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    ours, theirs = on_ort.run(x)[0], on_ov.run(x)[0]
    spread = float(ours.max() - ours.min())
    assert np.abs(ours - theirs).max() <= 0.05 * spread  # int8 off by a step here and there, not another network
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9


@needs_openvino
def test_openvino_cannot_read_the_lowered_graph_and_the_error_names_the_file(artifact: Path) -> None:
    with pytest.raises(ArtifactError, match=r"model\.onnx: OpenVINO cannot load it"):
        OPENVINO.load(artifact / "model.onnx", 1, {})
