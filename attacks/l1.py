"""The L1 threat model: Euclidean projections onto the L1 ball (alone and intersected with the
[0, 1] image box), a uniform random start in the ball, and the sparse steepest-ascent step.

Projection onto the L1 ball of radius eps (Duchi, Shalev-Shwartz, Singer & Chandra, ICML 2008,
"Efficient projections onto the l1-ball for learning in high dimensions", Fig. 1): the
projection of v is sign(v) * max(|v| - theta, 0), with theta found by sorting |v|.

With the image box, the perturbation delta of x must also satisfy -x <= delta <= 1 - x. Both
sets are convex and separable per coordinate, so by the KKT conditions the projection is
sign(v_i) * min(max(|v_i| - theta, 0), u_i), where u_i is the room towards sign(v_i)
(1 - x_i or x_i) and theta >= 0 is the smallest value whose L1 norm is <= eps. The norm is
piecewise linear and non-increasing in theta; theta is found by bisection. Clamping the plain L1
projection to the box instead stays feasible but is not the nearest point.
"""
from __future__ import annotations

import torch
from torch import Tensor

BISECTION_STEPS = 60  # halves the bracket [0, max|v|] down to float64 resolution


def _rows(v: Tensor) -> Tensor:
    return v.flatten(1)


def project_l1_ball(v: Tensor, eps: float) -> Tensor:
    """Per example (batch first), the nearest point to v in {d : ||d||_1 <= eps} (Duchi et al.
    2008, sorting-based, O(d log d))."""
    flat = _rows(v)
    a = flat.abs()
    inside = a.sum(1) <= eps
    if bool(inside.all()) or eps <= 0:
        return v.clone() if eps > 0 else torch.zeros_like(v)
    mu = a.sort(dim=1, descending=True).values
    cumsum = mu.cumsum(1)
    k = torch.arange(1, flat.shape[1] + 1, device=v.device, dtype=v.dtype)
    # rho: the largest k with mu_k > (sum_{j<=k} mu_j - eps) / k
    positive = mu * k > cumsum - eps
    rho = positive.sum(1, keepdim=True) - 1  # the condition holds exactly for k <= rho
    theta = (cumsum.gather(1, rho) - eps) / (rho + 1).to(v.dtype)
    out = flat.sign() * (a - theta).clamp_min(0)
    out = torch.where(inside[:, None], flat, out)
    return out.view_as(v)


def project_l1_box(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """Per example, the nearest perturbation to `delta` with ||d||_1 <= eps and x + d in [0, 1]
    (x in [0, 1], batch first). The result satisfies both constraints exactly."""
    flat, xf = _rows(delta), _rows(x)
    sign = flat.sign()
    room = torch.where(flat > 0, 1 - xf, xf).clamp_min(0)  # how far the box lets |d_i| go
    a = flat.abs()

    def size(theta: Tensor) -> Tensor:
        return torch.minimum((a - theta).clamp_min(0), room).sum(1, keepdim=True)

    work = torch.float64
    a, room = a.to(work), room.to(work)
    low = torch.zeros(flat.shape[0], 1, dtype=work, device=flat.device)
    high = a.amax(1, keepdim=True)
    feasible = size(low) <= eps  # the box alone already brings it inside the ball
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        over = size(mid) > eps
        low = torch.where(over, mid, low)
        high = torch.where(over, high, mid)
    theta = torch.where(feasible, torch.zeros_like(high), high)  # high: always <= eps
    out = sign * torch.minimum((a - theta).clamp_min(0), room).to(delta.dtype)
    # Rounding back to float32 may add a few ulps to the norm: rescale those rows.
    norm = out.abs().sum(1, keepdim=True)
    out = torch.where(norm > eps, out * (eps / norm), out)
    return out.view_as(delta)


def l1_random_start(x: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """x + a point drawn uniformly from the L1 ball of radius eps (a uniform point of the
    simplex from exponential spacings, random signs, radius eps * r^(1/d)), then clipped to
    [0, 1] (clipping only shrinks each coordinate, so the start stays in the ball)."""
    n, d = x.shape[0], x[0].numel()
    e = -torch.rand(n, d, generator=generator, device=x.device, dtype=x.dtype).clamp_min(
        1e-12).log()
    signs = torch.randint(0, 2, (n, d), generator=generator, device=x.device).to(x.dtype) * 2 - 1
    r = torch.rand(n, 1, generator=generator, device=x.device, dtype=x.dtype).pow(1.0 / d)
    delta = signs * e / e.sum(1, keepdim=True) * eps * r
    return (x + delta.view_as(x)).clamp(0.0, 1.0)


def l1_step(grad: Tensor, step_size: float, sparsity: float = 0.99) -> Tensor:
    """The sparse L1 ascent direction (SLIDE, Tramer & Boneh, NeurIPS 2019, arXiv 1904.13000):
    sign(g) on the coordinates whose |g| is in the top (1 - sparsity) share of each example,
    scaled so the step has L1 norm `step_size`. A plain steepest L1 step moves one coordinate
    and gets stuck against the box."""
    flat = _rows(grad)
    a = flat.abs()
    cut = torch.quantile(a, sparsity, dim=1, keepdim=True)
    mask = (a >= cut) & (a > 0)
    direction = flat.sign() * mask
    count = mask.sum(1, keepdim=True).clamp_min(1)
    return (direction * (step_size / count)).view_as(grad)
