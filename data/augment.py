"""Batched random crop (zero padding) + horizontal flip, on the tensor's own device.

Same distribution as torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip(), but for a
whole N×C×H×W batch at once: one pad, one gather, no per-sample Python loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (indices, per-sample parameters) on `device` without a host sync.

    A copy from pageable memory to a GPU waits for the GPU's queue to drain (every step would
    stall until the previous one has finished); from pinned memory it is queued like a kernel.
    """
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def crop_flip_params(n: int, generator: torch.Generator,
                     padding: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (dy, dx, flip) drawn on the CPU: offsets uniform in [0, 2*padding], flip p=0.5.

    Drawn from a CPU generator so CPU and GPU runs see the same random numbers.
    """
    if generator.device.type != "cpu":
        raise ValueError(f"augmentation needs a CPU torch.Generator, got one on {generator.device}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return offsets[0], offsets[1], flip


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              padding: int = 4) -> torch.Tensor:
    """Apply given per-sample crop offsets and flips to x (N×C×H×W, any dtype), same shape/dtype."""
    if x.dim() != 4:
        raise ValueError(f"expected an N×C×H×W batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    dev = x.device
    dy, dx, flip = (upload(t, dev) for t in (dy, dx, flip))
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x  # zeros
    # Output pixel (i, j) of sample k reads padded[k, :, dy_k + i, dx_k + j]; a flip reverses j.
    rows = dy[:, None] + torch.arange(h, device=dev)  # N×H
    cols = dx[:, None] + torch.arange(w, device=dev)  # N×W
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    k = torch.arange(n, device=dev)[:, None, None, None]
    ch = torch.arange(c, device=dev)[None, :, None, None]
    return padded[k, ch, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Randomly crop (with `padding` zero pixels) and flip each sample of x; keeps shape/dtype."""
    if x.dim() != 4:
        raise ValueError(f"expected an N×C×H×W batch, got shape {tuple(x.shape)}")
    return crop_flip(x, *crop_flip_params(x.shape[0], generator, padding), padding=padding)
