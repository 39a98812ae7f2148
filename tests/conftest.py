"""Shared fixtures: running `hat` in-process, tiny packed data, tiny recipes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hatcli.main import run_cli


@dataclass
class Result:
    """What one `hat` invocation returned and printed."""

    code: int
    out: str
    err: str

    def json(self) -> object:
        """Parse stdout as JSON (commands print one JSON object with --json)."""
        return json.loads(self.out)


@pytest.fixture
def hat(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run `hat ARGS...` in-process and capture its exit code, stdout and stderr."""

    def invoke(*args: str) -> Result:
        capsys.readouterr()
        code = run_cli([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small packed shapes classification dataset (160 images of 32x32), made once per session."""
    from hatcli.data.shapes import pack_shapes
    from hatcli.family import PackRequest

    root = tmp_path_factory.mktemp("shapes")
    pack_shapes(PackRequest(kind="shapes", target_data_dir=root, num_images=160, image_size=32, seed=3))
    return root


TINY_RECIPE = """
task = "tiny"
work_dir = "{work}"
seed = 0

[data]
root = "{data}"
input_size = [32, 32]
batch_size = 16
val_transforms = [{{ name = "Resize", size = [32, 32] }}]
train_transforms = [{{ name = "RandomHorizontalFlip" }}]

[model]
name = "mobilenet_v1"
alpha = 0.25
block_strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1]

[float]
epochs = 2
[float.optimizer]
lr = 0.05

[calibration]
num_batches = 2

[qat]
epochs = 1

[quant]
march = "nash_e"

[deploy]
perf_runs = 5
"""


@pytest.fixture
def tiny_recipe(tmp_path: Path, tiny_shapes: Path) -> Path:
    """A recipe that trains MobileNetV1 (alpha 0.25) on the tiny dataset in seconds."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE.format(work=tmp_path / "runs", data=tiny_shapes))
    return path


@pytest.fixture
def fresh_plugins() -> Callable[[], None]:
    """Reload the plugin registries after a test changed what is installed."""
    from hatcli.plugins import load_plugins

    yield lambda: load_plugins(reload=True)
    load_plugins(reload=True)


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one thread is faster (no intra-op sync), bitwise reproducible, and matches the
    kernels of spawned single-thread ranks. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
