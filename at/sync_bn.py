"""BatchNorm whose training-mode statistics are taken over the global batch (all ranks).

torch.nn.SyncBatchNorm runs on GPUs only; this one runs on every backend (NCCL and gloo), so the
multi-process tests on CPU exercise the code that runs on GPUs. In training mode it costs two
small all-reduces per layer in the forward pass (sum, then centred sum of squares: the two-pass
variance, no E[x^2] - E[x]^2 cancellation) and two in the backward pass. With one process, or in
eval mode, it is exactly nn.BatchNorm2d.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import distributed


class SyncBatchNorm2d(nn.BatchNorm2d):
    """Drop-in nn.BatchNorm2d (same parameters, buffers and state_dict keys)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or distributed.world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)),
                           xf.new_tensor([x.numel() // c], dtype=torch.float32)])
        total = distributed.differentiable_sum(local)
        n = total[c].detach()
        mean = total[:c] / n
        centred = xf - mean[None, :, None, None]
        var = distributed.differentiable_sum((centred * centred).sum((0, 2, 3))) / n
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                if m is None:  # cumulative moving average, as nn.BatchNorm2d
                    m = 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return out.to(x.dtype)


def convert(module: nn.Module) -> int:
    """Turn every nn.BatchNorm2d inside `module` into SyncBatchNorm2d in place; returns the count.

    The class is swapped on the existing objects (SyncBatchNorm2d adds no state), so parameters,
    buffers, optimizer references and state_dict keys are untouched.
    """
    count = 0
    for sub in module.modules():
        if type(sub) is nn.BatchNorm2d:
            sub.__class__ = SyncBatchNorm2d
            count += 1
    return count

