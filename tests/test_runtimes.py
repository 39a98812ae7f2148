"""Runtimes are plugins: ONNX Runtime is hat's own (registered by the built-in plugin, the default,
and the one proven equal to int_infer); another runtime comes through the `register_runtimes` hook.

- `hat compile` writes the artifact model each registered runtime reads (`lowered`: model.onnx;
  `qdq`: model_qdq.onnx) and records, per runtime, the model it reads, whether it is exact and
  whether it ran the artifact (`manifest["runtimes"]`).
- `load_artifact(..., runtime=NAME)`, `hat eval --stage deploy --runtime NAME`, `hat infer` and
  `hat perf` run the artifact on that runtime; an unknown runtime is a usage error that lists the
  registered ones, a runtime that is not installed says what to install, and an artifact without
  the model a runtime reads says to compile it again.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

from hatcli.deploy.compile import compile_model
from hatcli.deploy.runtime import ONNXRUNTIME, OrtSession, create_session, load_artifact
from hatcli.errors import ArtifactError, UsageError
from hatcli.plugins import load_plugins, runtimes
from hatcli.quant.march import load_march
from hatcli.runtime_spec import RuntimeSpec
from test_deploy import TinyCNN, export

SPEC = {"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32"}


class _Recorder:
    """A stand-in runtime that runs the QDQ model through ONNX Runtime and records what it was given."""

    loads: list[tuple[Path, int | None]] = []

    def __init__(self, model_path: Path, threads: int | None) -> None:
        _Recorder.loads.append((Path(model_path), threads))
        inner = OrtSession(create_session(model_path, "ORT_DISABLE_ALL", threads=threads))
        self.inputs, self.outputs, self._inner = inner.inputs, inner.outputs, inner

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self._inner.run(feed)


def _fake_spec(missing: str = "") -> RuntimeSpec:
    return RuntimeSpec(name="fake_qdq", description="a test runtime", form="qdq",
                       load=lambda path, threads, options: _Recorder(path, threads), missing=lambda: missing)


@pytest.fixture
def with_fake_runtime():
    """`install(missing="")` registers `fake_qdq` (a QDQ-reading runtime) beside the installed ones
    for one test."""
    registry = runtimes()

    def install(missing: str = "") -> RuntimeSpec:
        spec = _fake_spec(missing)
        registry.unregister(spec.name)
        registry.register(spec.name, spec, owner="test")
        return spec

    yield install
    registry.unregister("fake_qdq")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(TinyCNN(), tmp_path_factory.mktemp("src") / "model.onnx")


def test_onnxruntime_is_registered_by_the_builtin_plugin_and_is_the_exact_default() -> None:
    spec = runtimes().get("onnxruntime")
    assert spec is ONNXRUNTIME and spec.exact and spec.form == "lowered" and spec.missing() == ""
    assert "onnxruntime" in load_plugins().infos["builtin"].runtimes


def test_compile_records_each_runtime_its_model_and_whether_it_ran(source: Path, tmp_path: Path,
                                                                  with_fake_runtime) -> None:
    with_fake_runtime()
    art = compile_model(source, load_march("host"), 2, tmp_path / "art", SPEC)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["models"] == {"lowered": "model.onnx", "qdq": "model_qdq.onnx"}
    assert manifest["runtimes"]["onnxruntime"] == {"model": "model.onnx", "exact": True, "status": "ok"}
    assert manifest["runtimes"]["fake_qdq"] == {"model": "model_qdq.onnx", "exact": False, "status": "ok"}
    assert "model_qdq.onnx" in manifest["files"]  # checksummed like every file
    copied, exported = onnx.load(str(art / "model_qdq.onnx")), onnx.load(str(source))
    # the exported QDQ model, its weights inside the one file, without the exporter's stack traces
    assert [n.op_type for n in copied.graph.node] == [n.op_type for n in exported.graph.node]
    assert [onnx.numpy_helper.to_array(i).tolist() for i in copied.graph.initializer] == \
        [onnx.numpy_helper.to_array(i).tolist() for i in exported.graph.initializer]


def test_a_runtime_that_is_not_installed_is_recorded_so_and_asking_for_it_says_what_to_install(
        source: Path, tmp_path: Path, with_fake_runtime) -> None:
    with_fake_runtime(missing="pip install fake-runtime")
    art = compile_model(source, load_march("host"), 2, tmp_path / "art", SPEC)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["runtimes"]["fake_qdq"]["status"] == "not installed here: pip install fake-runtime"
    with pytest.raises(UsageError, match="runtime `fake_qdq` is not installed here: pip install fake-runtime"):
        load_artifact(art, runtime="fake_qdq")


def test_the_artifact_runs_on_the_chosen_runtime_with_its_model_and_threads(source: Path, tmp_path: Path,
                                                                           with_fake_runtime) -> None:
    with_fake_runtime()
    art = compile_model(source, load_march("host"), 2, tmp_path / "art", SPEC)
    _Recorder.loads.clear()
    on_fake = load_artifact(art, threads=1, runtime="fake_qdq")
    assert _Recorder.loads == [(art / "model_qdq.onnx", 1)] and on_fake.runtime == "fake_qdq"
    on_ort = load_artifact(art)
    assert on_ort.runtime == "onnxruntime" and on_ort.model_path == art / "model.onnx"
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert on_fake.input_names == on_ort.input_names and on_fake.output_names == on_ort.output_names
    # the same network: the QDQ model and the lowered graph agree to a few output steps
    np.testing.assert_allclose(on_fake.run(x)[0], on_ort.run(x)[0], atol=0.5)


def test_an_unknown_runtime_is_a_usage_error_naming_the_registered_ones(source: Path, tmp_path: Path) -> None:
    art = compile_model(source, load_march("host"), 2, tmp_path / "art", SPEC)
    with pytest.raises(UsageError, match="onnxruntime"):
        load_artifact(art, runtime="tensorrt")


def test_an_artifact_without_the_runtimes_model_says_to_compile_it_again(source: Path, tmp_path: Path,
                                                                        with_fake_runtime) -> None:
    art = compile_model(source, load_march("host"), 2, tmp_path / "art", SPEC)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["models"].pop("qdq", None)  # as compiled where no QDQ-reading runtime was installed
    (art / "manifest.json").write_text(json.dumps(manifest))
    with_fake_runtime()
    with pytest.raises(ArtifactError, match="no `qdq` model .* compile it again"):
        load_artifact(art, runtime="fake_qdq")


def test_runtime_options_apply_only_to_the_deploy_stage(hat, tiny_recipe: Path) -> None:
    result = hat("eval", tiny_recipe, "--stage", "float", "--runtime", "onnxruntime")
    assert result.code == 2 and "only the deploy stage runs on a runtime" in result.err
    result = hat("infer", tiny_recipe, "--input", tiny_recipe, "--stage", "int_infer", "--runtime", "onnxruntime")
    assert result.code == 2 and "--stage deploy" in result.err


def test_hat_perf_measures_on_the_chosen_runtime(hat, source: Path, tmp_path: Path) -> None:
    art = compile_model(source, load_march("host"), 2, tmp_path / "art", SPEC)
    report = hat("perf", art, "--runtime", "onnxruntime", "--runs", "3", "--json").json()
    assert report["measured"]["runtime"] == "onnxruntime"
    result = hat("perf", art, "--runtime", "tensorrt", "--runs", "3")
    assert result.code == 2 and "unknown runtime `tensorrt`" in result.err


def test_hat_plugins_lists_the_runtimes(hat) -> None:
    rows = {row["name"]: row for row in hat("plugins", "--json").json()}
    assert rows["builtin"]["runtimes"] == ["onnxruntime"]


needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("hat_openvino") is None,
    reason="needs OpenVINO and the hat-openvino plugin (pip install -e 'plugins/openvino_runtime[openvino]')")


@needs_openvino
def test_a_trained_run_evaluates_on_openvino_beside_the_integer_program(hat, tiny_recipe: Path) -> None:
    assert hat("run", tiny_recipe, "--json").code == 0
    report = hat("eval", tiny_recipe, "--stage", "deploy", "--runtime", "openvino", "--compare", "int_infer",
                 "--json").json()
    assert report["runtime"] == "openvino" and set(report["stages"]) == {"deploy", "int_infer"}
    (pair,) = report["agreement"]
    assert pair["images"] > 0 and 0 <= pair["top1_agreement"] <= 100 and pair["max_diff_steps"] >= 0
    exact = hat("eval", tiny_recipe, "--stage", "deploy", "--compare", "int_infer", "--json").json()
    assert exact["runtime"] == "onnxruntime" and exact["agreement"][0]["max_diff_steps"] == 0
    assert exact["agreement"][0]["top1_agreement"] == 100
    text = hat("eval", tiny_recipe, "--stage", "deploy", "--runtime", "openvino")
    assert text.code == 0 and "deploy (openvino)" in text.out


def test_hat_check_says_which_runtimes_compute_int_infers_integers(hat, source: Path, with_fake_runtime) -> None:
    with_fake_runtime(missing="pip install fake-runtime")
    result = hat("check", "--model", source, "--march", "host", "--json")
    rows = {row["name"]: row for row in json.loads(result.out)["runtimes"]}
    assert rows["onnxruntime"]["exact"] and rows["onnxruntime"]["installed"]
    assert not rows["fake_qdq"]["exact"] and rows["fake_qdq"]["install"] == "pip install fake-runtime"
    assert "--runtime fake_qdq --compare int_infer" in rows["fake_qdq"]["note"]
    text = hat("check", "--model", source, "--march", "host").out
    assert "runtime onnxruntime: computes the integer program's integers" in text
