"""Single-step inner maximisation (one gradient of the objective per batch), and `maximise`, which
runs the attack a training config names (docs/reference.md#single-step-attacks).

    fgsm     Goodfellow et al. 2015: x_adv = clip(x + eps sign g(x)), no random start.
    fgsm_rs  Wong et al., ICLR 2020 ("Fast is better than free"): d ~ U(-eps, eps)^d,
             d <- P_eps(d + alpha sign g(x + d)), alpha = 1.25 eps; x + d kept in [0, 1].
    n_fgsm   de Jorge et al., NeurIPS 2022 ("Make some noise"): e ~ U(-k eps, k eps)^d,
             x_adv = clip_[0,1](x + e + alpha sign g(x + e)), alpha = eps, k = 2; no projection
             onto the eps-ball, so ||x_adv - x||_inf may reach (k + 1) eps.

g is the gradient of the objective (summed over the batch). Like `pgd`, these never see a model:
the caller builds the objective and freezes the model. Only the linf threat model is defined.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .pgd import Objective, pgd, project

SINGLE_STEP = ("fgsm", "fgsm_rs", "n_fgsm")
KINDS = ("pgd", *SINGLE_STEP)
# The papers' step, as a multiple of eps (attack.step_factor: null).
DEFAULT_STEP_FACTOR = {"fgsm": 1.0, "fgsm_rs": 1.25, "n_fgsm": 1.0}
DEFAULT_K = 2.0  # N-FGSM noise radius in units of eps (de Jorge et al.)


def uniform_noise(x: Tensor, radius: float, generator: torch.Generator | None = None) -> Tensor:
    """Noise uniform in the linf ball of `radius`: (2 u - 1) radius with u = torch.rand."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (2 * u - 1) * radius


def _signed_gradient(objective: Objective, z: Tensor) -> Tensor:
    z = z.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(z).sum(), z)
    return grad.sign()


def fgsm(objective: Objective, x: Tensor, *, eps: float, step_size: float,
         random_start: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """FGSM (random_start=False) or FGSM-RS (random_start=True): one signed-gradient step of
    `step_size` from x (or from x + U(-eps, eps) clipped to [0, 1]), projected onto the eps-ball
    and [0, 1]. Returns detached images."""
    x = x.detach()
    start = (x + uniform_noise(x, eps, generator)).clamp(0.0, 1.0) if random_start else x
    return project(start + step_size * _signed_gradient(objective, start), x, eps, "linf").detach()


def n_fgsm(objective: Objective, x: Tensor, *, eps: float, step_size: float, k: float = DEFAULT_K,
           generator: torch.Generator | None = None) -> Tensor:
    """N-FGSM: the gradient at the noisy point x + e (e ~ U(-k eps, k eps), not clipped, as in
    the paper), one signed step of `step_size` from there, clipped to [0, 1] only. Returns
    detached images within (k eps + step_size) of x."""
    x = x.detach()
    noisy = x + uniform_noise(x, k * eps, generator)
    return (noisy + step_size * _signed_gradient(objective, noisy)).clamp(0.0, 1.0).detach()


def maximise(objective: Objective, x: Tensor, *, kind: str = "pgd", eps: float,
             step_size: float, steps: int = 1, norm: str = "linf", init: str = "uniform",
             clamp_init: bool = True, k: float = DEFAULT_K,
             generator: torch.Generator | None = None) -> Tensor:
    """The inner attack `kind` (KINDS) on `objective`. pgd takes steps, norm, init, clamp_init;
    the single-step kinds ignore them (one step, linf) and n_fgsm takes k."""
    if kind == "pgd":
        return pgd(objective, x, eps=eps, step_size=step_size, steps=steps, norm=norm, init=init,
                   clamp_init=clamp_init, generator=generator)
    if kind not in SINGLE_STEP:
        raise ValueError(f"unknown attack kind {kind!r}; valid: {', '.join(KINDS)}")
    if norm != "linf":
        raise ValueError(f"attack kind {kind} is defined for linf only, not {norm}")
    if kind == "n_fgsm":
        return n_fgsm(objective, x, eps=eps, step_size=step_size, k=k, generator=generator)
    return fgsm(objective, x, eps=eps, step_size=step_size, random_start=kind == "fgsm_rs",
                generator=generator)
