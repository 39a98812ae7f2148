"""BatchNorm in the deploy graph: folded where exact, a depthwise 1x1 conv where folding would
change what another reader of the convolution sees (hatcli.quant.batchnorm)."""

from __future__ import annotations

import torch
from torch import nn

from hatcli.quant.flow import export_deploy_graph
from tiny_nets import TinyFamily


class SharedConvOutput(nn.Module):
    """A pre-activation pattern: the stem conv feeds a BatchNorm and, unnormalised, the shortcut;
    a BatchNorm after a ReLU (no conv before it) too."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.bn3 = nn.BatchNorm2d(8)
        for bn in (self.bn1, self.bn2, self.bn3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            nn.init.uniform_(bn.weight, 0.5, 2)
            nn.init.uniform_(bn.bias, -1, 1)

    def forward(self, x):
        y = self.stem(x)
        z = self.bn2(self.conv(torch.relu(self.bn1(y))))
        return self.bn3(torch.relu(z + y))


class _Family(TinyFamily):
    def build_deploy_model(self, float_model):
        return float_model


def _batch_norms(graph) -> list:
    return [n for n in graph.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]


def test_a_batchnorm_on_a_shared_conv_output_keeps_the_other_reader_unnormalised():
    model = SharedConvOutput().eval()
    graph = export_deploy_graph(_Family(), model, (8, 8))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), atol=1e-5, rtol=1e-5)
    assert not _batch_norms(graph)  # folded (bn2) or a depthwise conv (bn1, bn3): no float BatchNorm left
    depthwise = [n for n in graph.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.conv2d.default
                 and len(n.args) > 6 and n.args[6] == 8]
    assert len(depthwise) == 2

