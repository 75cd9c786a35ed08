"""BatchNorm settings shared by the model builders, and ghost BatchNorm (statistics per block of
rows, as nn.DataParallel computes them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def set_bn_momentum(model: nn.Module, momentum: float) -> nn.Module:
    """Every BatchNorm's running-statistics momentum (model.bn_momentum); returns the model."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    return model


class GhostBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that, in train mode, normalises each of `groups` row blocks of the batch with
    that block's own statistics, and updates the running statistics from the first block only.

    This is what a network wrapped in nn.DataParallel over `groups` GPUs computes: the batch is
    scattered into torch.chunk(groups) blocks, every replica normalises its block, and only the
    replica on the first device shares its buffers with the module (the others update copies
    that are thrown away). The reference IKL-AT runs used 4 GPUs this way. In eval mode, or with
    one group, this is exactly nn.BatchNorm2d; state_dict keys are unchanged.
    """

    groups = 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.groups == 1:
            return super().forward(x)
        blocks = x.chunk(self.groups)
        first = super().forward(blocks[0])
        rest = [F.batch_norm(b, None, None, self.weight, self.bias, True, 0.0, self.eps)
                for b in blocks[1:]]
        return torch.cat([first, *rest])


def set_bn_groups(module: nn.Module, groups: int) -> int:
    """Turn every nn.BatchNorm2d of `module` into GhostBatchNorm2d with `groups` row blocks, in
    place (the class is swapped on the existing objects: parameters, buffers and optimizer
    references are untouched); returns the number of layers."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"model.bn_groups must be an integer >= 1, got {groups!r}")
    count = 0
    for sub in module.modules():
        if type(sub) in (nn.BatchNorm2d, GhostBatchNorm2d):
            sub.__class__ = GhostBatchNorm2d
            sub.groups = groups
            count += 1
    return count
