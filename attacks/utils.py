"""Helpers shared by attacks and their callers."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# How BatchNorm layers normalise while an attack runs: "eval" (running statistics; TRADES, AWP,
# DKL) or "train" (each forward's batch statistics, running statistics neither used nor updated;
# Wang et al. 2023, gowal21uncovering/utils/trades.py).
BN_MODES = ("eval", "train")


@contextlib.contextmanager
def frozen(model: nn.Module, bn: str = "eval") -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients, restored on exit. Freezing the parameters lets
    autograd skip the weight-gradient half of every backward pass inside the attack (about a
    third of its cost). bn="train" keeps the BatchNorm layers in train mode with running-statistics
    tracking switched off: they normalise with the batch statistics and leave their buffers alone
    (num_batches_tracked included)."""
    if bn not in BN_MODES:
        raise ValueError(f"unknown BatchNorm mode {bn!r} for the attack; valid: "
                         f"{', '.join(BN_MODES)}")
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in grads:
        p.requires_grad_(False)
    try:
        if bn == "train":
            with batch_statistics(model):
                yield model
        else:
            yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in grads.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """BatchNorm layers in train mode with running-statistics tracking off: they normalise with
    each forward's batch statistics and leave their buffers (num_batches_tracked included)
    alone; the other modules' modes are not touched. Restored on exit."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:
        m.train()
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m, (mode, flag) in zip(norms, saved):
            m.training, m.track_running_stats = mode, flag
