"""What a runtime plugin provides: a way to run an artifact's model on this machine (`--runtime NAME`).

hat ships one runtime, `onnxruntime`; a plugin adds others through the `register_runtimes` hook
(the bundled `hat-openvino` adds `openvino`). A runtime is data plus two functions: `load` opens a
model file for running, `missing` says what is not installed. Nothing here imports a runtime, so
registering one costs no import of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import numpy as np

ModelForm = Literal["lowered", "qdq"]
"""Which of an artifact's models a runtime reads. `lowered`: hat's compiled integer graph
(QLinearConv, ConvInteger, MatMulInteger and explicit requantization, as ONNX Runtime runs it,
`model.onnx`); `qdq`: the exported QuantizeLinear / DequantizeLinear model (`model_qdq.onnx`),
which runtimes that do their own int8 lowering (OpenVINO) read."""

MODEL_FORMS: tuple[str, ...] = ("lowered", "qdq")


@dataclass(frozen=True)
class TensorInfo:
    """One input of a loaded model: its name, its shape (a name for a dynamic dimension) and its
    numpy dtype name (`float32`, `uint8`, ...)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


class RuntimeSession(Protocol):
    """A model loaded by a runtime, ready to run batches."""

    inputs: list[TensorInfo]
    """The model's inputs, in order."""
    outputs: list[str]
    """The model's output names, in order."""

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch (input name -> array); return the outputs in `outputs` order."""
        ...


def _nothing_missing() -> str:
    return ""


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime registered under a plain name (`--runtime NAME`, `hat benchmark` rows).

    `load(model_path, threads, options)` opens an ONNX model file (`threads`: intra-op threads,
    None for the runtime's default; `options`: the artifact manifest's `session_options`, empty for
    a bare model) and returns a `RuntimeSession`; it raises `hatcli.errors.ArtifactError` naming the
    file when the runtime cannot load it. `missing()` returns "" when the runtime is usable here,
    else one line that says what to install. `form` is the artifact model the runtime reads (see
    `ModelForm`). `exact` is True only for a runtime whose int8 arithmetic hat's tests prove equal
    to the integer program (`int_infer`); for the others, `hat eval --stage deploy --runtime NAME
    --compare int_infer` measures how far they are.
    """

    name: str
    description: str
    form: ModelForm
    load: Callable[[Path, int | None, Mapping[str, Any]], RuntimeSession]
    missing: Callable[[], str] = _nothing_missing
    exact: bool = False
