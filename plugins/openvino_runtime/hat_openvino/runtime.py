"""OpenVINO as a hat runtime: an artifact's QDQ model (`model_qdq.onnx`) read by OpenVINO's ONNX
frontend and compiled for the CPU plugin, which lowers QuantizeLinear / DequantizeLinear pairs to
its own int8 kernels.

OpenVINO cannot read hat's lowered integer graph (its ONNX frontend fails on QLinearConv with
per-channel weight scales and has no com.microsoft QLinearGlobalAveragePool), so this runtime reads
the QDQ form. Its int8 arithmetic is its own (where it rounds and how it requantizes), so the
runtime is not `exact`: `hat eval --stage deploy --runtime openvino --compare int_infer` measures
how far it is from the integer program. Float parts run in f32 (`INFERENCE_PRECISION_HINT`): the
CPU plugin's default on CPUs with bf16 support is bf16, which would add its own error.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hatcli.errors import ArtifactError
from hatcli.runtime_spec import RuntimeSpec, TensorInfo

INSTALL = "pip install openvino (or: pip install 'hat-openvino[openvino]')"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(exc).__name__])[0]


_CORE: Any = None


def _core() -> Any:
    """One OpenVINO Core per process: each Core keeps its own plugin state and thread pools, and hat
    opens many models in one process (every compile runs the artifact once on each runtime)."""
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


class OpenVinoSession:
    """A model compiled by OpenVINO for the CPU, as a `hatcli.runtime_spec.RuntimeSession`."""

    def __init__(self, model_path: Path, threads: int | None, precision: Any = "f32") -> None:
        core = _core()
        try:
            model = core.read_model(str(model_path))
            config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
            if threads is not None:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises plain RuntimeError with a C++ trace
            raise ArtifactError(f"{model_path}: OpenVINO cannot load it ({_first_line(exc)})") from None
        self.request = self.compiled.create_infer_request()
        self.inputs = [TensorInfo(port.get_any_name(),
                                  tuple(d.get_length() if d.is_static else "N" for d in port.get_partial_shape()),
                                  np.dtype(port.get_element_type().to_dtype()).name)
                       for port in self.compiled.inputs]
        self.outputs = [port.get_any_name() for port in self.compiled.outputs]

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; the outputs in `outputs` order (copies: OpenVINO reuses its buffers)."""
        results = self.request.infer(dict(feed))
        return [np.array(results[port], copy=True) for port in self.compiled.outputs]


def load_openvino(model_path: Path, threads: int | None, options: Mapping[str, Any]) -> OpenVinoSession:
    """Open `model_path` with OpenVINO on the CPU, float parts in f32 (`options` are ONNX Runtime's
    session options and do not apply)."""
    return OpenVinoSession(Path(model_path), threads)


def openvino_missing() -> str:
    """"" when OpenVINO can be imported here, else the line that says how to install it."""
    return "" if importlib.util.find_spec("openvino") is not None else INSTALL


OPENVINO = RuntimeSpec(
    name="openvino", form="qdq", load=load_openvino, missing=openvino_missing, exact=False,
    description="Intel OpenVINO, CPU plugin: reads the artifact's QDQ model and lowers it to its own int8 "
                "kernels (not bit-exact with int_infer; hat eval --compare measures how far)")
"""The runtime this plugin registers."""
