"""Small QDQ ONNX graphs for the host micro-benchmarks, shaped like what `hat export` writes.

Each graph is a float input quantized to int8, then a chain of quantized ops in torchao's QDQ
form (`DequantizeLinear` -> op -> `QuantizeLinear`, int8 per-channel weights, int32 biases, all
zero points 0). The micro-benchmarks lower them with the compiler's own passes
(`hatcli.deploy.compile.lower_graph`), so what is timed is what a compiled artifact runs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class QdqChain:
    """Builds a QDQ graph op by op; `current` is the name of the latest (dequantized) tensor."""

    def __init__(self, channels: int, size: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.channels, self.size = channels, size
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])
        self.scale = 0.05
        self.current = self._requantize("x", signed=True)

    def _name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def _const(self, value: np.ndarray, stem: str) -> str:
        name = self._name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def _requantize(self, tensor: str, signed: bool) -> str:
        """QuantizeLinear -> DequantizeLinear of `tensor` (int8, or uint8 after a ReLU)."""
        zero = np.int8(0) if signed else np.uint8(0)
        scale, zp = self._const(np.float32(self.scale), "s"), self._const(zero, "z")
        q, dq = self._name("q"), self._name("dq")
        self.nodes += [helper.make_node("QuantizeLinear", [tensor, scale, zp], [q], name=q),
                       helper.make_node("DequantizeLinear", [q, scale, zp], [dq], name=dq)]
        return dq

    def conv(self, cout: int, kernel: int = 1, stride: int = 1, depthwise: bool = False, relu: bool = True,
             output: bool = False) -> "QdqChain":
        """A quantized conv (+ReLU); `output` makes its result the graph's (dequantized int32) output."""
        cin = self.channels
        per_group = 1 if depthwise else cin
        q_w = self.rng.integers(-127, 128, size=(cout, per_group, kernel, kernel)).astype(np.int8)
        w_scale = np.full(cout, 0.01, np.float32)
        w_dq = self._name("wdq")
        self.nodes.append(helper.make_node(
            "DequantizeLinear", [self._const(q_w, "w"), self._const(w_scale, "ws"), self._const(np.zeros(cout, np.int8), "wz")],
            [w_dq], axis=0, name=w_dq))
        b_dq = self._name("bdq")
        self.nodes.append(helper.make_node(
            "DequantizeLinear", [self._const(self.rng.integers(-500, 500, cout).astype(np.int32), "b"),
                                 self._const((w_scale * np.float32(self.scale)).astype(np.float32), "bs"),
                                 self._const(np.zeros(cout, np.int32), "bz")], [b_dq], axis=0, name=b_dq))
        y = self._name("conv")
        self.nodes.append(helper.make_node("Conv", [self.current, w_dq, b_dq], [y], kernel_shape=[kernel, kernel],
                                           strides=[stride, stride], pads=[kernel // 2] * 4,
                                           group=cin if depthwise else 1, name=y))
        self.channels, self.size = cout, (self.size + 2 * (kernel // 2) - kernel) // stride + 1
        if output:
            self.current = y
            return self
        if relu:
            r = self._name("relu")
            self.nodes.append(helper.make_node("Relu", [y], [r], name=r))
            y = r
        self.current = self._requantize(y, signed=not relu)
        return self

    def add(self, other: str) -> "QdqChain":
        """Quantized elementwise add of the current tensor and `other` (same shape)."""
        y = self._name("add")
        self.nodes.append(helper.make_node("Add", [self.current, other], [y], name=y))
        self.current = self._requantize(y, signed=True)
        return self

    def sigmoid(self) -> "QdqChain":
        """A quantized sigmoid, which the compiler turns into a 256-entry table."""
        y = self._name("sigmoid")
        self.nodes.append(helper.make_node("Sigmoid", [self.current], [y], name=y))
        self.current = self._requantize(y, signed=False)
        return self

    def model(self) -> onnx.ModelProto:
        """The graph so far, its last tensor as the output."""
        out = helper.make_tensor_value_info(self.current, TensorProto.FLOAT, None)
        graph = helper.make_graph(list(self.nodes), "qdq_chain", [self.input], [out], list(self.inits))
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def pointwise_chain(layers: int, channels: int, size: int, relu: bool = True) -> QdqChain:
    """`layers` 1x1 conv (+ReLU) layers: the baseline the add and table chains are compared with."""
    chain = QdqChain(channels, size)
    for _ in range(layers):
        chain.conv(channels, relu=relu)
    return chain


def residual_chain(layers: int, channels: int, size: int) -> QdqChain:
    """`layers` times a 1x1 conv + ReLU followed by a quantized add of the conv's input."""
    chain = QdqChain(channels, size)
    for _ in range(layers):
        skip = chain.current
        chain.conv(channels).add(skip)
    return chain


def table_chain(layers: int, channels: int, size: int) -> QdqChain:
    """`layers` times a 1x1 conv (no ReLU) followed by a quantized sigmoid."""
    chain = QdqChain(channels, size)
    for _ in range(layers):
        chain.conv(channels, relu=False).sigmoid()
    return chain


def stem_conv(size: int, kernel: int = 3, cout: int = 32) -> tuple[onnx.ModelProto, int, int]:
    """A 3-channel `kernel` x `kernel` stride-2 conv on a `size` x `size` RGB image (MobileNet's
    3x3 stem, ResNet's 7x7 one); returns it, its MACs and its output elements."""
    chain = QdqChain(3, size).conv(cout, kernel=kernel, stride=2)
    outputs = cout * chain.size * chain.size
    return chain.model(), outputs * 3 * kernel * kernel, outputs


def output_conv(channels: int, size: int, cout: int) -> tuple[onnx.ModelProto, int]:
    """A 3x3 conv whose int32 accumulator is the (dequantized) graph output, like a detection head's
    last conv; returns it and its MACs."""
    chain = QdqChain(channels, size).conv(cout, kernel=3, output=True)
    return chain.model(), cout * size * size * channels * 9
