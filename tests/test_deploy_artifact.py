"""A compiled artifact is a portable, self-checking folder.

- The loader runs only a model the manifest pins: `model` must be the plain name of one of the
  checksummed files inside the folder; anything else is refused (ArtifactError, exit 1) naming
  the folder and the key.
- No file of the artifact holds an absolute path of the machine that built it.
- perf.json / perf.html / `hat perf` name each layer by its ONNX node *and* the module path it
  was traced from, and perf.html is titled with the task, not the file name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hatcli.deploy.compile import compile_model
from hatcli.deploy.onnx_graph import read_graph
from hatcli.deploy.runtime import load_artifact, sha256_file
from hatcli.errors import ArtifactError
from hatcli.quant.march import load_march
from test_deploy import TinyCNN, export

SPEC = {"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32"}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(TinyCNN(), tmp_path_factory.mktemp("src") / "model.onnx")


@pytest.fixture
def artifact(source: Path, tmp_path: Path) -> Path:
    return compile_model(source, load_march("host"), 2, tmp_path / "art", SPEC, {"task": "tiny"}, name="tiny")


def _rewrite_manifest(art: Path, **changes: object) -> None:
    manifest = json.loads((art / "manifest.json").read_text())
    manifest.update(changes)
    (art / "manifest.json").write_text(json.dumps(manifest))


# -- item 13: `model` is a checksummed file inside the folder ----------------------------------

def test_manifest_model_pointing_outside_the_folder_is_refused(artifact: Path, source: Path) -> None:
    other = artifact.parent / "other.onnx"
    other.write_bytes(source.read_bytes())
    _rewrite_manifest(artifact, model="../other.onnx")
    with pytest.raises(ArtifactError, match=r"`model`") as info:
        load_artifact(artifact)
    assert str(artifact) in str(info.value)
    assert ArtifactError.exit_code == 1


@pytest.mark.parametrize("name", ["/etc/passwd", ".", "..", "sub/model.onnx", ""])
def test_manifest_model_that_is_not_a_plain_file_name_is_refused(artifact: Path, name: str) -> None:
    _rewrite_manifest(artifact, model=name)
    with pytest.raises(ArtifactError, match=r"`model`"):
        load_artifact(artifact)


def test_manifest_model_naming_an_unlisted_file_inside_the_folder_is_refused(artifact: Path, source: Path) -> None:
    (artifact / "unchecked.onnx").write_bytes(source.read_bytes())
    _rewrite_manifest(artifact, model="unchecked.onnx")
    with pytest.raises(ArtifactError, match=r"`model`.*unchecked\.onnx.*not one of the checksummed files"):
        load_artifact(artifact)


def test_listed_model_that_is_a_symlink_leaving_the_folder_is_refused(artifact: Path, source: Path) -> None:
    outside = artifact.parent / "outside.onnx"
    outside.write_bytes(source.read_bytes())
    (artifact / "linked.onnx").symlink_to(outside)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"]["linked.onnx"] = sha256_file(outside)
    _rewrite_manifest(artifact, model="linked.onnx", files=manifest["files"])
    with pytest.raises(ArtifactError, match="outside the artifact"):
        load_artifact(artifact)


def test_untouched_artifact_still_loads(artifact: Path) -> None:
    assert load_artifact(artifact).model_path == artifact / "model.onnx"


# -- item 14: nothing machine-specific inside the artifact --------------------------------------

def test_no_file_of_the_artifact_holds_an_absolute_path(artifact: Path, source: Path, tmp_path: Path) -> None:
    forbidden = {str(tmp_path), str(source.parent), str(Path.home()), os.getcwd()}
    for path in artifact.iterdir():
        text = path.read_bytes().decode("utf-8", errors="replace")
        for needle in forbidden:
            assert needle not in text, f"{path.name} holds {needle}"
    perf = json.loads((artifact / "perf.json").read_text())
    assert perf["measured"]["model"] == "model.onnx"


def test_perf_still_estimates_from_the_source_model_through_a_relative_path(artifact: Path, source: Path) -> None:
    from hatcli.deploy.recipe_build import estimation_source

    manifest = json.loads((artifact / "manifest.json").read_text())
    assert not Path(manifest["source"]["path"]).is_absolute()
    assert estimation_source(artifact).resolve() == source.resolve()


def test_a_copied_artifact_loads_and_estimates_from_its_own_model(artifact: Path, tmp_path: Path) -> None:
    import shutil

    from hatcli.deploy.recipe_build import estimation_source

    copy = tmp_path / "elsewhere" / "deep" / "copy"
    shutil.copytree(artifact, copy)
    assert load_artifact(copy).model_path == copy / "model.onnx"
    assert estimation_source(copy) == copy / "model.onnx"


# -- item 21: module paths beside ONNX node names; the task in the title ------------------------

def test_layers_carry_the_module_path_they_were_traced_from(source: Path) -> None:
    modules = {layer.name: layer.module for layer in read_graph(source).layers}
    by_op = {layer.op_type: layer.module for layer in read_graph(source).layers}
    assert "stem" in modules.values()  # conv + bn + relu of `stem` fuse into one layer named after it
    assert "dw" in modules.values() and "pw" in modules.values()
    assert by_op["Gemm"] == "fc"


def test_perf_json_and_html_show_module_paths_and_the_task(artifact: Path) -> None:
    perf = json.loads((artifact / "perf.json").read_text())
    layers = perf["estimate"]["layers"]
    assert {"stem", "dw", "pw", "fc"} <= {layer["module"] for layer in layers}
    page = (artifact / "perf.html").read_text()
    assert "<title>tiny on host" in page and "<title>model" not in page
    for layer in layers:
        if layer["module"]:
            assert f"<td class='l'>{layer['module']}</td>" in page


def test_hat_perf_lists_the_slowest_layers_with_their_module(hat, artifact: Path) -> None:
    result = hat("perf", artifact, "--no-measure")
    assert result.code == 0, result.err
    assert "module" in result.out and "stem" in result.out
    as_json = hat("perf", artifact, "--no-measure", "--json").json()
    assert {"stem", "fc"} <= {layer["module"] for layer in as_json["estimate"]["layers"]}


def test_hat_check_names_the_module_of_every_layer(hat, source: Path) -> None:
    rows = hat("check", "--model", source, "--march", "nash_e", "--json").json()["rows"]
    assert [row["module"] for row in rows if row["op_type"] == "Gemm"] == ["fc"]
