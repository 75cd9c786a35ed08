"""PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018, arXiv 1706.06083): minimise cross-entropy on PGD examples that maximise it."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from attacks import frozen, maximise

from ..schedules import AttackBudget
from .base import Method, StepOutput


class PGDAT(Method):
    """BN: eval mode during the attack (running statistics, no updates), one train-mode forward of
    the adversarial batch for the update."""

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, budget: AttackBudget) -> Tensor:
        with frozen(model, budget.bn):
            # Summed, not averaged: each example's gradient is independent of the batch size.
            return maximise(lambda z: F.cross_entropy(model(z), y, reduction="sum"), x,
                            **budget.attack_kwargs())

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> StepOutput:
        model.train()
        logits_adv = model(x_adv)
        return StepOutput({"ce_adv": self.cross_entropy(logits_adv, y)}, logits_adv=logits_adv)
