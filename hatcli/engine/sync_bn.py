"""BatchNorm whose batch statistics cover the global batch of all processes, on CPU as on GPU.

PyTorch's `SyncBatchNorm` runs only on CUDA (DistributedDataParallel refuses it on CPU), so
`convert_sync_batchnorm` uses it on GPUs and `GlooSyncBatchNorm` elsewhere. The latter sums
the per-channel count and sum, then the squared deviations from the global mean, over all ranks
with a differentiable all-reduce,
so N processes with batch B/N normalise - and back-propagate - exactly like one process with
batch B (up to float rounding).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


_GROUP: list[dist.ProcessGroup] = []


def _stats_group() -> dist.ProcessGroup:
    """A process group of its own for the statistics.

    DistributedDataParallel all-reduces gradient buckets asynchronously while backward runs;
    sharing its group, our backward all-reduces could pair up with its buckets in a different
    order on different ranks and silently sum the wrong tensors. Created on first use, which
    every rank reaches in the same forward pass.
    """
    if not _GROUP:
        _GROUP.append(dist.new_group(backend="gloo"))
    return _GROUP[0]


class _SumAcrossRanks(torch.autograd.Function):
    """Sum a tensor over all ranks; the gradient is summed the same way (every rank's loss
    depends on every rank's contribution)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=_stats_group())
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=_stats_group())
        return out


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with statistics all-reduced across the process group in training mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise with global-batch statistics when training under torch.distributed."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        # Two passes (mean, then the mean squared deviation), as BatchNorm itself computes them:
        # E[x^2] - E[x]^2 loses the variance of near-constant channels to rounding.
        stats = _SumAcrossRanks.apply(torch.cat([count, x.sum(dim=(0, 2, 3))]))
        n = stats[0]
        mean = stats[1:] / n
        centered = x - mean[None, :, None, None]
        var = _SumAcrossRanks.apply((centered * centered).sum(dim=(0, 2, 3))) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        y = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d of `model` by a synchronised one (torch's on CUDA, ours elsewhere)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        synced = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module
