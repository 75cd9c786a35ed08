"""GradAlign (Andriushchenko & Flammarion, "Understanding and Improving Fast Adversarial
Training", NeurIPS 2020, arXiv 2007.02617): a regulariser that keeps the input gradient aligned
inside the eps-ball, which is what single-step training loses at catastrophic overfitting.

    term = lambda * (1 - mean_i cos(g_i(x_i), g_i(x_i + eta_i))),  eta ~ U(-eps, eps)^d,
    g_i(z) = grad_z CE(f(z), y_i)

as in the paper's Eq. (6) and the authors' code: one gradient at the clean image, one at a
uniform point of the eps-ball (x + eta clipped to [0, 1], our choice: images stay valid). The
clean gradient is a constant (not differentiated, as in the authors' code); the noisy one is
differentiated through (double backpropagation). An example whose gradient is exactly zero at
either point has no cosine and is left out of the mean (0 when every example is). BatchNorm uses
the batch's statistics (the reference's train-mode model) without updating the running ones:
the method's outer forwards alone set those, as without GradAlign. docs/reference.md#gradalign
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.single_step import uniform_noise
from attacks.utils import batch_statistics
from errors import ConfigError


def check_config(method_cfg: dict) -> None:
    lam = method_cfg["grad_align"]
    if not lam >= 0:  # also NaN
        raise ConfigError(f"method.grad_align (GradAlign lambda) must be >= 0, got {lam}")


def input_gradient(model: nn.Module, z: Tensor, y: Tensor, *, create_graph: bool) -> Tensor:
    """grad_z of the batch-summed cross-entropy (per-example gradients, one backward)."""
    z = z.detach().requires_grad_(True)
    loss = F.cross_entropy(model(z), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, z, create_graph=create_graph)
    return grad


def alignment_loss(g_clean: Tensor, g_noisy: Tensor) -> Tensor:
    """1 - mean cosine between per-example gradients (rows of the flattened tensors), over the
    examples whose two gradients are both non-zero."""
    a, b = g_clean.flatten(1), g_noisy.flatten(1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    keep = (na > 0) & (nb > 0)
    cos = (a * b).sum(1) / (na * nb).where(keep, torch.ones_like(na))
    return ((1.0 - cos) * keep).sum() / keep.sum().clamp_min(1)


class GradAlign:
    """The term for the trainer's outer loss. `eps`: the current training radius (eps_t), set
    by the trainer each epoch."""

    def __init__(self, lam: float, eps: float = 0.0):
        self.lam, self.eps = lam, eps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
        with batch_statistics(model):
            g_clean = input_gradient(model, x, y, create_graph=False)
            noisy = (x + uniform_noise(x, self.eps, generator)).clamp(0.0, 1.0)
            g_noisy = input_gradient(model, noisy, y, create_graph=True)
        return self.lam * alignment_loss(g_clean, g_noisy)
