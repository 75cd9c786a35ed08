"""Projected gradient ascent on an objective callable (Madry et al., ICLR 2018, arXiv 1706.06083).

`pgd` never sees a model, labels or BatchNorm mode: the caller builds `objective(x_adv) -> loss`
(a scalar, or per-example losses that are summed) and freezes the model. Example, TRADES' attack:

    with frozen(model):
        p_clean = model(x).softmax(1)
        x_adv = pgd(lambda z: kl_to(p_clean, model(z)), x, eps=8/255, step_size=2/255, steps=10)
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .l1 import l1_random_start, l1_step, project_l1_box

Objective = Callable[[Tensor], Tensor]
NORMS = ("linf", "l2", "l1")


def eps_problem(key: str, eps: float, norm: str, numel: int) -> str | None:
    """Why `eps` cannot be meant as a radius around [0, 1] images of `numel` values (None when
    it can). The usual slip is 8 for 8/255, which would attack (and train) at 2040/255."""
    if norm == "linf" and eps >= 1:
        why = "must be < 1 under linf (pixels are in [0, 1])"
    elif norm == "l2" and eps > math.sqrt(numel):
        why = (f"exceeds the l2 diameter of the [0, 1] image box (sqrt({numel}) = "
               f"{math.sqrt(numel):.1f})")
    elif norm == "l1" and eps > numel:
        why = f"exceeds the l1 diameter of the [0, 1] image box ({numel})"
    else:
        return None
    return f"{key}={eps:g} {why}; did you mean {eps:g}/255?"
INITS = ("normal", "uniform", "none")


def _per_sample_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project onto the eps-ball around x (L-inf box or L2 ball), then onto the image box [0,1].
    L1: the exact Euclidean projection onto the ball intersected with the box (`project_l1_box`).
    """
    delta = x_adv - x
    if norm == "l1":
        return (x + project_l1_box(delta, x, eps)).clamp(0.0, 1.0)
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: Tensor, eps: float, norm: str, init: str, *, clamp: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:
    """normal: x + 0.001 N(0,1) (TRADES; a tiny nudge so the KL gradient at x_adv = x is not zero).
    uniform: uniform in the L-inf box / L2 / L1 ball of radius eps (Madry). none: x itself."""
    if init == "none" or eps == 0:
        return x.clone()
    if init == "uniform" and norm == "l1":
        return l1_random_start(x, eps, generator)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if init == "normal":
        start = x + 0.001 * noise
    elif norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        start = x + (2 * u - 1) * eps
    else:
        r = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        r = r.pow(1.0 / x[0].numel()).view(-1, *([1] * (x.dim() - 1)))
        start = x + noise / _per_sample_norm(noise) * eps * r
    return start.clamp(0.0, 1.0) if clamp else start


def pgd(objective: Objective, x: Tensor, *, eps: float, step_size: float, steps: int,
        norm: str = "linf", init: str = "uniform", clamp_init: bool = True,
        generator: torch.Generator | None = None) -> Tensor:
    """Maximise `objective` over the eps-ball around `x` intersected with [0,1].

    Args:
        objective: x_adv -> loss to maximise (scalar, or per-example losses that are summed).
        x: clean images in [0,1], any shape with the batch first.
        eps, step_size: radius and step on the [0,1] pixel scale.
        steps: number of gradient steps (0 returns the projected random start).
        norm: "linf" (signed-gradient steps), "l2" (per-example normalised gradient steps) or
            "l1" (sparse steps of L1 norm step_size, `attacks.l1.l1_step`).
        init: "normal", "uniform" or "none" (see `random_start`).
        clamp_init: clip the random start to [0,1] before the first objective call.
    Returns:
        detached adversarial images with ||x_adv - x|| <= eps and 0 <= x_adv <= 1.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    x = x.detach()
    x_adv = random_start(x, eps, norm, init, clamp=clamp_init, generator=generator)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = objective(x_adv)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        with torch.no_grad():
            if norm == "linf":
                x_adv = x_adv + step_size * grad.sign()
            elif norm == "l1":
                x_adv = x_adv + l1_step(grad, step_size)
            else:
                x_adv = x_adv + step_size * grad / _per_sample_norm(grad)
            x_adv = project(x_adv, x, eps, norm)
    if steps == 0:
        x_adv = project(x_adv, x, eps, norm)
    return x_adv.detach()
