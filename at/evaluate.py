"""Clean and PGD accuracy of a model on a tensor dataset, always in float32 and eval mode."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks import frozen, pgd


def _as_float(x: Tensor) -> Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256,
             eps: float = 0.0, steps: int = 0, step_size: float = 0.0, norm: str = "linf",
             seed: int = 0) -> float:
    """Top-1 accuracy in percent. With steps > 0: under PGD-`steps` on the cross-entropy from a
    uniform random start, seeded by `seed` so that every call attacks identically.

    `x` may be uint8 (0..255) or float in [0,1], on any device; batches move to the model's device.
    """
    if len(x) == 0:
        return float("nan")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    correct = torch.zeros((), dtype=torch.long, device=device)
    with frozen(model):
        for start in range(0, len(x), batch_size):
            xb = _as_float(x[start:start + batch_size].to(device, non_blocking=True))
            yb = y[start:start + batch_size].to(device, non_blocking=True)
            if steps > 0:
                xb = pgd(lambda z: F.cross_entropy(model(z), yb, reduction="sum"), xb, eps=eps,
                         step_size=step_size, steps=steps, norm=norm, init="uniform",
                         generator=generator)
            with torch.no_grad():
                correct += (model(xb).argmax(dim=1) == yb).sum()
    return 100.0 * correct.item() / len(x)
