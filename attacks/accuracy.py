"""Per-example correctness of a model, clean or under PGD (cross-entropy or CW margin), on tensors
or a stream of batches, in eval mode: the primitive of the trainer's validation and of eval/."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data import to_float

from .pgd import pgd
from .utils import frozen


def _images(x: Tensor) -> Tensor:
    """float32 images in [0, 1] from uint8 (data.to_float) or from floats already scaled."""
    return to_float(x) if x.dtype == torch.uint8 else x.float()


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example margin max_{i != y} z_i - z_y (Carlini & Wagner); positive = misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


ATTACK_LOSSES = {
    "ce": lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
    "cw": cw_margin,
}


def correct(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256,
            **kwargs) -> Tensor:
    """Per-example correctness (bool, on the CPU) on tensors: `x` may be uint8 (0..255) or float
    in [0,1], on any device. Keyword arguments as for `correct_batches`."""
    device = next(model.parameters()).device
    batches = ((_images(x[s:s + batch_size].to(device, non_blocking=True)),
                y[s:s + batch_size].to(device, non_blocking=True))
               for s in range(0, len(x), batch_size))
    return correct_batches(model, batches, **kwargs)


def correct_batches(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                    eps: float = 0.0, steps: int = 0, step_size: float = 0.0,
                    norm: str = "linf", loss: str = "ce", seed: int = 0) -> Tensor:
    """Per-example correctness (bool, on the CPU) over (x float [0,1], y) batches on the model's
    device. With steps > 0: under PGD-`steps` maximising `loss` ("ce" or "cw") from a uniform
    random start, seeded by `seed` so every call attacks identically."""
    objective = ATTACK_LOSSES[loss]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    flags = []
    with frozen(model):
        for xb, yb in batches:
            if steps > 0:
                xb = pgd(lambda z: objective(model(z), yb), xb, eps=eps, step_size=step_size,
                         steps=steps, norm=norm, init="uniform", generator=generator)
            with torch.no_grad():
                flags.append(model(xb).argmax(dim=1) == yb)
    # One transfer at the end: no host synchronisation per batch.
    return torch.cat(flags).cpu() if flags else torch.zeros(0, dtype=torch.bool)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, **kwargs) -> float:
    """Top-1 accuracy in percent (NaN for an empty set); keyword arguments as for `correct`."""
    flags = correct(model, x, y, **kwargs)
    return 100.0 * flags.double().mean().item() if len(flags) else float("nan")
