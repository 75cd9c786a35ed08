"""Loss functions of logits used by the adversarial-training methods. No models, no optimizers.

Shapes: logits are B x C float tensors; every function returns a scalar averaged over the batch
unless stated otherwise. References: TRADES (Zhang et al., ICML 2019, arXiv 1901.08573) and
"Decoupled Kullback-Leibler Divergence Loss" (Cui et al., NeurIPS 2024, arXiv 2305.13948), whose
Theorem 1 splits KL into a weighted MSE of logit differences (wMSE) and a soft-label CE (SCE).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_ce(logits_adv: Tensor, logits_clean: Tensor) -> Tensor:
    """Batch mean of -sum_c sg(softmax(logits_clean))_c * log_softmax(logits_adv)_c.

    The target is detached, so only `logits_adv` receives gradient.
    """
    target = F.softmax(logits_clean.detach(), dim=1)
    return -(target * F.log_softmax(logits_adv, dim=1)).sum(dim=1).mean()


def pair_weighted_mse(logits_a: Tensor, logits_b: Tensor, weights: Tensor) -> Tensor:
    """Per-sample 1/4 * sum_{j,k} w_j w_k ((a_j - a_k) - (b_j - b_k))^2, shape B.

    Exact O(B*C) form of the pairwise sum: with d = a - b and S = sum_j w_j it equals
    0.5 * S * sum_j w_j (d_j - dbar)^2, dbar = sum_j w_j d_j / S (half a weighted variance of the
    logit gap, centred for numerical stability). No B x C x C tensor is ever built.
    """
    d = logits_a - logits_b
    total = weights.sum(dim=1, keepdim=True)
    mean = (weights * d).sum(dim=1, keepdim=True) / total.clamp_min(torch.finfo(d.dtype).tiny)
    return 0.5 * total.squeeze(1) * (weights * (d - mean).square()).sum(dim=1)


def trades_kl(logits_adv: Tensor, logits_clean: Tensor) -> Tensor:
    """Batch mean of KL(softmax(logits_clean) || softmax(logits_adv)); both inputs get gradients."""
    log_p_clean = F.log_softmax(logits_clean, dim=1)
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    return (log_p_clean.exp() * (log_p_clean - log_p_adv)).sum(dim=1).mean()


def dkl_loss(logits_adv: Tensor, logits_clean: Tensor, *, alpha: float = 1.0,
             beta: float = 1.0) -> Tensor:
    """Decoupled KL (DKL paper, Theorem 1): beta * wMSE + alpha * SCE.

    wMSE uses per-sample pair weights softmax(clean) softmax(clean)^T under stop-gradient and
    stop-gradient on the adversarial logits, so it feeds only the clean branch; SCE feeds only the
    adversarial branch. With alpha = beta = 1 its gradients equal those of `trades_kl`.
    """
    weights = F.softmax(logits_clean.detach(), dim=1)
    wmse = pair_weighted_mse(logits_clean, logits_adv.detach(), weights).mean()
    return beta * wmse + alpha * soft_ce(logits_adv, logits_clean)


def ikl_terms(logits_adv: Tensor, logits_clean: Tensor, class_weights: Tensor, *,
              gamma: float = 1.0, version: str = "v1") -> dict[str, Tensor]:
    """The two unweighted IKL terms, {'wmse': ..., 'sce': ...} (docs/reference.md#ikl-and-gkl).

    Args:
        class_weights: B x C, row b = P[y_b], the class-wise prior of sample b's label (constant).
        version: "v1" (IKL): wMSE summed over the batch / B. "v2" (GKL): weights ** gamma and the
            sum divided by the total pair weight sum_b (sum_j w_bj)^2 (equal to v1 when gamma = 1
            and the rows sum to 1).
    wMSE has no stop-gradient (both branches learn from it); the SCE target is detached.
    """
    weights = class_weights.detach()
    if version == "v1":
        if gamma != 1.0:
            raise ValueError(f"gamma={gamma} has no meaning for IKL v1; use version='v2'")
        wmse = pair_weighted_mse(logits_clean, logits_adv, weights).sum() / logits_adv.shape[0]
    elif version == "v2":
        weights = weights.pow(gamma)
        pair_mass = weights.sum(dim=1).square().sum()
        wmse = pair_weighted_mse(logits_clean, logits_adv, weights).sum() / pair_mass
    else:
        raise ValueError(f"unknown IKL version {version!r}; valid: v1, v2")
    return {"wmse": wmse, "sce": soft_ce(logits_adv, logits_clean)}


def ikl_loss(logits_adv: Tensor, logits_clean: Tensor, class_weights: Tensor, *,
             alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
             version: str = "v1") -> Tensor:
    """IKL(z_adv, z_clean) = beta * wMSE + alpha * SCE (see `ikl_terms` for the arguments)."""
    if beta == 0:  # e.g. the CIFAR-10 attack objective: skip the wMSE it would multiply by 0
        return alpha * soft_ce(logits_adv, logits_clean)
    terms = ikl_terms(logits_adv, logits_clean, class_weights, gamma=gamma, version=version)
    return beta * terms["wmse"] + alpha * terms["sce"]

