"""Helpers for testing a family plugin that wraps a library's model registry (timm, torchvision, or
a third party's): write a small recipe of the family, run `hat` in-process, make the library's
weight downloads an error, and train one float epoch and calibrate on generated shapes data.

Used by the bundled library families' tests (plugins/timm_family/tests,
plugins/torchvision_family/tests) and open to third-party plugins' tests; it needs pytest, which
hat itself does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hatcli.data.shapes import pack_shapes
from hatcli.family import PackRequest
from hatcli.main import run_cli

LIBRARY_RECIPE = """
task = "{task}"
work_dir = "{work}"
seed = 0

[data]
root = "{data}"
input_size = [{h}, {w}]
batch_size = 16
val_transforms = [{{ name = "Resize", size = [{h}, {w}] }}]

[model]
name = "{family}"
arch = "{arch}"
options = {options}

[float]
epochs = 1

[calibration]
num_batches = 2

[quant]
march = "nash_e"
"""


def library_recipe(tmp_path: Path, *, family: str, task: str, arch: str, options: str, data: Path | None = None,
                   size: tuple[int, int] = (32, 32)) -> Path:
    """A recipe file `tmp_path/<family>.toml` of `family` with `[model] arch` and `options` (a TOML
    inline table), the input size `size` and one epoch of float training and two calibration batches."""
    path = tmp_path / f"{family}.toml"
    path.write_text(LIBRARY_RECIPE.format(task=task, work=tmp_path / "runs", data=data or tmp_path / "data",
                                          family=family, arch=arch, options=options, h=size[0], w=size[1]))
    return path


def run_hat(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run `hat ARGS...` in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = run_cli([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refusing_downloads(library: str, *places: tuple[object, str]) -> Any:
    """A fixture that makes `torch.hub.load_state_dict_from_url` and each `(object, attribute)` of
    `places` (the library's own ways to fetch weights) an error, so a test fails if hat asked
    `library` for pretrained weights."""

    @pytest.fixture
    def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"hat asked {library} for pretrained weights")

        for holder, name in (*places, (torch.hub, "load_state_dict_from_url")):
            monkeypatch.setattr(holder, name, refuse)

    return no_download


def tiny_run(capsys: pytest.CaptureFixture[str], tmp_path: Path, family: str, task: str, arch: str,
             options: str) -> dict[str, Any]:
    """Pack 48 shapes images (6 classes), train `family`'s `arch` with `options` one float epoch and
    calibrate it, on one thread; return the float stage's last checkpoint, once the calibration
    stage's record says it finished with a top-1."""
    data = tmp_path / "data"
    pack_shapes(PackRequest(kind="shapes", target_data_dir=data, num_images=48, image_size=32, seed=1))
    path = library_recipe(tmp_path, family=family, task=task, arch=arch, options=options, data=data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster
    try:
        for stage in ("float", "calibration"):
            code, _, err = run_hat(capsys, "train", path, "--stage", stage)
            assert code == 0, err
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "runs" / task / "calibration" / "stage.json").read_text())
    assert record["finished"] and "top1" in record["metrics"]
    return torch.load(tmp_path / "runs" / task / "float" / "checkpoint-last.pt", weights_only=True)

