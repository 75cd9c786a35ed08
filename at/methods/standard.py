"""Standard (non-adversarial) training: cross-entropy on clean images. Baseline and sanity check."""
from __future__ import annotations

from torch import Tensor, nn

from ..schedules import AttackBudget
from .base import Method, StepOutput


class Standard(Method):
    """BN: one train-mode forward of the clean batch."""

    uses_attack = False

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, budget: AttackBudget) -> Tensor:
        return x

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> StepOutput:
        model.train()
        logits = model(x)
        return StepOutput({"ce": self.cross_entropy(logits, y)}, logits_clean=logits)
