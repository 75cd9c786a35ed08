"""Distillation losses: pure functions of student and teacher logits (B x C), batch means.

The teacher side is always detached (a frozen teacher): only the student receives gradient.
References: KD (Hinton et al. 2015, arXiv 1503.02531), DKD (Zhao et al., CVPR 2022, arXiv
2203.08679), IKL-KD / GKL-KD (Cui et al., NeurIPS 2024, arXiv 2305.13948;
docs/reference.md#ikl-kd) and WKD-L (Lv et al., NeurIPS 2024, arXiv 2412.08139;
docs/reference.md#wkd-l).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import pair_weighted_mse


def kd_loss(z_s: Tensor, z_t: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), batch mean."""
    t = temperature
    log_p_t = F.log_softmax(z_t.detach() / t, dim=1)
    log_p_s = F.log_softmax(z_s / t, dim=1)
    return t * t * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def _binary_kl(p_t: Tensor, p_s: Tensor) -> Tensor:
    """Per-sample KL between the Bernoulli distributions (p, 1 - p) of teacher and student."""
    eps = torch.finfo(p_s.dtype).tiny
    q_t, q_s = 1 - p_t, 1 - p_s
    return (p_t * (p_t.clamp_min(eps).log() - p_s.clamp_min(eps).log())
            + q_t * (q_t.clamp_min(eps).log() - q_s.clamp_min(eps).log()))


def dkd_terms(z_s: Tensor, z_t: Tensor, y: Tensor, temperature: float = 4.0
              ) -> dict[str, Tensor]:
    """Per-sample DKD terms (shape B), both multiplied by T^2 like KD:

    tckd: KL of the binary (target, all non-target) distributions at temperature T;
    nckd: KL of the distributions over the C - 1 non-target classes (renormalised).
    Identity (DKD paper, eq. 4): kd_b = tckd_b + (1 - p_t,b[y_b]) * nckd_b.
    """
    t = temperature
    z_t = z_t.detach()
    target = F.one_hot(y, z_s.shape[1]).bool()
    p_s = F.softmax(z_s / t, dim=1)
    p_t = F.softmax(z_t / t, dim=1)
    tckd = _binary_kl(p_t[target], p_s[target])
    # Non-target classes only: masking the target with -inf renormalises over the others.
    log_q_s = F.log_softmax((z_s / t).masked_fill(target, float("-inf")), dim=1)
    log_q_t = F.log_softmax((z_t / t).masked_fill(target, float("-inf")), dim=1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).masked_fill(target, 0.0).sum(1)
    return {"tckd": t * t * tckd, "nckd": t * t * nckd}


def dkd_loss(z_s: Tensor, z_t: Tensor, y: Tensor, *, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0) -> Tensor:
    """Decoupled KD: alpha * TCKD + beta * NCKD, batch mean (without the warm-up factor)."""
    terms = dkd_terms(z_s, z_t, y, temperature)
    return (alpha * terms["tckd"] + beta * terms["nckd"]).mean()


def ikl_kd_terms(z_s: Tensor, z_t: Tensor, weights: Tensor, *, temperature: float = 4.0,
                 gamma: float = 1.0, version: str = "v1") -> dict[str, Tensor]:
    """IKL-KD (v1) / GKL-KD (v2) terms {'wmse', 'sce'} (docs/reference.md#ikl-kd), unweighted.

    weights: B x C, constant: the class prior row of each sample's label (GI) or
        softmax(z_t / T2) (per-sample weights). v2 raises them to `gamma`.
    wmse: 0.25 * sum_{b,j,k} w_bj w_bk ((t_bj - t_bk) - (s_bj - s_bk))^2 on raw logits, divided
        by B (v1) or by the total pair weight sum_b (sum_j w_bj)^2 (v2).
    sce: soft cross-entropy -sum softmax(z_t / T) log_softmax(z_s / T), batch mean, no T^2.
    """
    z_t, weights = z_t.detach(), weights.detach()
    if version == "v1":
        if gamma != 1.0:
            raise ValueError(f"gamma={gamma} has no meaning for IKL-KD v1; use version='v2'")
        norm = z_s.shape[0]
    elif version == "v2":
        weights = weights.pow(gamma)
        norm = weights.sum(dim=1).square().sum()
    else:
        raise ValueError(f"unknown IKL-KD version {version!r}; valid: v1, v2")
    wmse = pair_weighted_mse(z_t, z_s, weights).sum() / norm
    t = temperature
    sce = -(F.softmax(z_t / t, dim=1) * F.log_softmax(z_s / t, dim=1)).sum(1).mean()
    return {"wmse": wmse, "sce": sce}


def sinkhorn_plan(p_s: Tensor, p_t: Tensor, cost: Tensor, *, reg: float = 0.05,
                  iterations: int = 10) -> Tensor:
    """Entropic optimal-transport plan between p_s (rows) and p_t (columns), unrolled so that it
    is differentiable: K = exp(-cost / reg), u_0 = 1/n, then `iterations` times
    v = p_t / (K^T u + 1e-8), u = p_s / (K v + 1e-8); plan = diag(u) K diag(v).

    Shapes: p_s, p_t B x n (rows sum to 1); cost B x n x n (or n x n). Computed in float32 (or
    the inputs' float64) whatever the autocast state: exp(-cost / 0.05) needs the range.
    """
    dtype = torch.float64 if p_s.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=p_s.device.type, enabled=False):
        p_s, p_t, cost = p_s.to(dtype), p_t.to(dtype), cost.to(dtype)
        kernel = torch.exp(-cost / reg).expand(p_s.shape[0], -1, -1)
        u = torch.full_like(p_s, 1.0 / p_s.shape[1])
        v = p_t
        for _ in range(iterations):
            v = p_t / (torch.bmm(kernel.transpose(1, 2), u[:, :, None]).squeeze(2) + 1e-8)
            u = p_s / (torch.bmm(kernel, v[:, :, None]).squeeze(2) + 1e-8)
        return u[:, :, None] * kernel * v[:, None, :]


def _non_target(z: Tensor, target: Tensor) -> Tensor:
    """B x C logits without each row's target column -> B x (C - 1), order kept."""
    return z[~target].view(z.shape[0], z.shape[1] - 1)


def wkd_logit_terms(z_s: Tensor, z_t: Tensor, y: Tensor, cost: Tensor, *,
                    temperature: float = 2.0, reg: float = 0.05, iterations: int = 10
                    ) -> dict[str, Tensor]:
    """WKD-L terms (docs/reference.md#wkd-l), batch means:

    target: -p_t[y] * log_softmax(z_s)[y] at T = 1 (teacher probability detached);
    wd: entropic Wasserstein distance sum_ij P_ij D_ij between the non-target distributions
        softmax(z^{-y} / T) of student (rows) and teacher (columns), D = `cost` (C x C, already
        sharpened and positive, see at/kd_cost_matrix.py) restricted to the non-target classes.
    """
    z_t = z_t.detach()
    n, c = z_s.shape
    target = F.one_hot(y, c).bool()
    p_t_full = F.softmax(z_t, dim=1)
    target_term = -(p_t_full[target] * F.log_softmax(z_s, dim=1)[target]).mean()
    p_s = F.softmax(_non_target(z_s, target) / temperature, dim=1)
    p_t = F.softmax(_non_target(z_t, target) / temperature, dim=1)
    # Per sample, the cost between its C - 1 non-target classes.
    keep = (~target).nonzero()[:, 1].view(n, c - 1)  # non-target class indices per row
    sub_cost = cost[keep[:, :, None], keep[:, None, :]]  # B x (C-1) x (C-1)
    plan = sinkhorn_plan(p_s, p_t, sub_cost, reg=reg, iterations=iterations)
    wd = (plan * sub_cost.to(plan.dtype)).sum(dim=(1, 2)).mean()
    return {"target": target_term, "wd": wd}
