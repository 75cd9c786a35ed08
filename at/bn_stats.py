"""Replaying a BatchNorm running-statistics update instead of recomputing the forward that made it.

A train-mode BatchNorm layer moves its running estimates towards the batch statistics s of its
input: r <- (1 - f) r + f s, with f = momentum (or 1 / num_batches_tracked when momentum is None).
Reference implementations sometimes run the same batch through the network twice at the same
weights (TRADES runs the clean batch twice per step): the second forward computes the same s in
every layer, so its only lasting effect is a second update with the same f s. `BNUpdate` records
f s = r_after - (1 - f) r_before around the first forward and `replay` applies it again: the
reference's running statistics (to rounding) for the cost of a few per-channel vector operations,
not a forward pass. It works for every BatchNorm implementation here (nn.BatchNorm2d, ghost and
synchronised BatchNorm), since it only looks at the buffers.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def tracking_layers(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of `module` that update running statistics in a forward now."""
    return [m for m in module.modules()
            if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
            and m.running_mean is not None]


def _factor(layer: _BatchNorm) -> float | Tensor:
    """The weight f of the current batch in the layer's running average (after the increment of
    num_batches_tracked that a forward makes)."""
    if layer.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
        return 1.0 / layer.num_batches_tracked.double()
    return layer.momentum


class BNUpdate:
    """What one train-mode forward of `module` adds to its BatchNorm running statistics.

        update = BNUpdate(model)     # before the forward
        logits = model(x)
        update.done()                # after it
        ...
        update.replay()              # = the running-statistics effect of model(x) once more

    Layers the forward did not run are left unchanged by `replay` (their recorded update is the
    identity, to rounding). No host synchronisation: everything stays on the device.
    """

    def __init__(self, module: nn.Module):
        self.layers = tracking_layers(module)
        with torch.no_grad():
            self._before = [(m.running_mean.clone(), m.running_var.clone(),
                             m.num_batches_tracked.clone()) for m in self.layers]
        self._added: list[tuple[Tensor, Tensor, Tensor, float | Tensor]] | None = None

    @torch.no_grad()
    def done(self) -> None:
        """Call right after the forward: keeps f s of every layer and drops the snapshot."""
        added = []
        for m, (mean, var, count) in zip(self.layers, self._before):
            f = _factor(m)
            added.append((m.running_mean - (1 - f) * mean, m.running_var - (1 - f) * var,
                          m.num_batches_tracked - count, f))
        self._added, self._before = added, []

    @torch.no_grad()
    def replay(self) -> None:
        """Apply the recorded update again at the layers' current running statistics."""
        if self._added is None:
            raise RuntimeError("BNUpdate.replay before done()")
        for m, (mean, var, count, f) in zip(self.layers, self._added):
            m.num_batches_tracked.add_(count)
            g = _factor(m)
            # g == f unless momentum is None (then f s is rescaled to g s).
            scale = 1.0 if isinstance(g, float) and g == f else g / f
            # Through .data: autograd saved these buffers with the forward (train-mode backward
            # does not read them), and an in-place update of the tensors themselves would fail
            # the version check of the backward that follows.
            m.running_mean.data.mul_(1 - g).add_(mean * scale)
            m.running_var.data.mul_(1 - g).add_(var * scale)


def forward_recorded(model: nn.Module, x: Tensor) -> tuple[Tensor, BNUpdate]:
    """model(x) and the BatchNorm update it made (see BNUpdate)."""
    update = BNUpdate(model)
    out = model(x)
    update.done()
    return out, update
