"""Randomised defences: detected as AutoAttack detects them (its randomness flag: outputs that
change between identical forward passes), attacked with AutoAttack's `rand` version (APGD with
expectation over transformation), and scored over DRAWS forward passes of the final points
(docs/zoo.md#randomised-defences).

A point is robust in the worst case only when every draw classifies it correctly; the mean over
draws is the accuracy an average forward pass has.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import aa_flags

DRAWS = 10


def detect(model: nn.Module, x: Tensor, y: Tensor, device: torch.device,
           batch_size: int) -> dict:
    """AutoAttack's randomness flag on the first batch: {'raised': bool, 'message': ..., ...}."""
    n = min(len(x), batch_size)
    return aa_flags.randomized_flag(model, x[:n], y[:n], device)


def correct_draws(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int,
                  device: torch.device, draws: int = DRAWS) -> Tensor:
    """How many of `draws` forward passes classify each point correctly (int64 N)."""
    counts = torch.zeros(len(y), dtype=torch.long)
    with torch.no_grad():
        for _ in range(draws):
            counts += torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu()
                                 == y[i:i + batch_size] for i in range(0, len(y), batch_size)])
    return counts
