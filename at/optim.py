"""SGD with optional weight-decay exemption for BatchNorm parameters."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def build_optimizer(optim_cfg: dict, modules: Iterable[nn.Module], *,
                    fused: bool = False) -> torch.optim.SGD:
    """SGD over the parameters of `modules` (the model, plus any trainable method state).

    `fused`: one fused kernel updates every parameter (CPU and CUDA) instead of a loop over
    tensors; the update is the same arithmetic (tests/test_speed.py compares them).

    With `no_decay_bn`, BatchNorm weights and biases get no weight decay (Wang et al. 2023);
    the DKL reference decays every parameter. The learning rate is set per epoch by the trainer.
    """
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            is_bn = isinstance(sub, nn.modules.batchnorm._BatchNorm)
            for p in sub.parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    (no_decay if is_bn and optim_cfg["no_decay_bn"] else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim_cfg["weight_decay"]}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=optim_cfg["lr"], momentum=optim_cfg["momentum"],
                           nesterov=optim_cfg["nesterov"], fused=fused or None)


@torch.no_grad()
def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (momentum buffers) its parameter's memory layout.

    A checkpoint written with another `speed.channels_last` holds NCHW buffers for NHWC
    parameters; the fused update walks both as flat memory and would silently mix up elements.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and \
                        value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p).copy_(value)
