"""TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
ICML 2019, arXiv 1901.08573): CE(f(x), y) + beta * KL(p(x) || p(x_adv)); the attack maximises
the KL."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from attacks import frozen, pgd

from ..losses import trades_kl
from .base import AttackBudget, Method, StepOutput


class TRADES(Method):
    """BN: eval mode during the attack, whose clean logits are computed once per batch (the
    reference recomputes them at every step, with identical results in eval mode); then two
    separate train-mode forwards, clean first, as in the reference."""

    def __init__(self, num_classes: int, beta: float = 6.0, label_smoothing: float = 0.0):
        super().__init__(num_classes, label_smoothing)
        self.beta = beta

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, budget: AttackBudget) -> Tensor:
        with frozen(model):
            with torch.no_grad():
                logits_clean = model(x)
            return pgd(lambda z: trades_kl(model(z), logits_clean), x, **budget.pgd_kwargs())

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor,
             views: int = 1) -> StepOutput:
        model.train()
        logits_clean = model(x)
        logits_adv = model(x_adv)
        terms = {"ce": self.cross_entropy(logits_clean, y),
                 "kl": self.beta * trades_kl(logits_adv, logits_clean)}
        return StepOutput(terms, logits_adv=logits_adv, logits_clean=logits_clean)
