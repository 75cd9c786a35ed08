"""IKL-AT (Cui et al., "Decoupled Kullback-Leibler Divergence Loss", NeurIPS 2024,
arXiv 2305.13948).

Outer loss CE(f(x), y) + beta * wMSE + alpha * SCE (`at.losses.ikl_terms`), where wMSE weights the
pairwise logit differences with a class-wise prior P[y] learned from the model's own clean
predictions over the previous epoch (docs/reference.md#ikl-at).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks import frozen, maximise
from errors import ConfigError

from ..losses import ikl_loss, ikl_terms
from ..schedules import AttackBudget
from .base import Method, StepOutput, update_class_prior

# The loss AWP climbs with two views: "joint" = the reference's calc_awp, one CE + IKL over all 2B
# rows weighted equally (no aug_weight); "weighted" = the outer loss, per view, aug-weighted.
AWP_VIEWS = ("joint", "weighted")


class IKLAT(Method):
    """BN: eval mode during the attack, whose clean logits are computed once per batch (the
    reference recomputes them every step; identical in eval mode). Then two separate train-mode
    forwards, adversarial first, as in the reference (each with its own batch statistics).

    Class prior P (C x C): row c is the mean of softmax(z_clean / temperature) over the epoch's
    training images of class c, from the outer pass (train-mode BN, weights before the update).
    Epoch 1 uses the uniform prior; P is saved with the run (buffers `prior`, `prior_sum`).
    """

    supports_views = True
    accumulators = ("prior_sum",)

    def __init__(self, num_classes: int, alpha: float = 3.0, beta: float = 20.0,
                 version: str = "v1", gamma: float = 1.0, temperature: float = 4.0,
                 prior_momentum: float = 1.0, attack_alpha: float = 1.0,
                 attack_beta: float = 0.0, attack_gamma: float | None = 1.0,
                 aug_weight: float = 1.0, awp_views: str = "joint",
                 label_smoothing: float = 0.0):
        super().__init__(num_classes, label_smoothing)
        if version not in ("v1", "v2"):
            raise ConfigError(f"unknown IKL version {version!r}; valid: v1, v2")
        if version == "v1" and (gamma != 1.0 or (attack_gamma or 1.0) != 1.0):
            raise ConfigError("method.ikl_at.gamma / attack_gamma apply to version v2 only; "
                             "set them to 1.0 or use version=v2")
        if temperature <= 0:
            raise ConfigError(f"method.ikl_at.temperature must be > 0, got {temperature}")
        if awp_views not in AWP_VIEWS:
            raise ConfigError(f"method.ikl_at.awp_views must be one of {', '.join(AWP_VIEWS)}, "
                             f"got {awp_views!r}")
        if not 0.0 < prior_momentum <= 1.0:
            raise ConfigError(f"method.ikl_at.prior_momentum must be in (0, 1], "
                             f"got {prior_momentum}")
        self.alpha, self.beta, self.version, self.gamma = alpha, beta, version, gamma
        self.temperature, self.prior_momentum = temperature, prior_momentum
        self.attack_alpha, self.attack_beta = attack_alpha, attack_beta
        self.attack_gamma = gamma if attack_gamma is None else attack_gamma
        self.aug_weight, self.awp_views = aug_weight, awp_views
        self.register_buffer("prior", torch.full((num_classes, num_classes), 1.0 / num_classes))
        # Running sum of this epoch's soft predictions per true class (kept in float64 so that a
        # long epoch's sum does not lose precision); the row sums are the class counts.
        self.register_buffer("prior_sum",
                             torch.zeros(num_classes, num_classes, dtype=torch.float64))

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, budget: AttackBudget) -> Tensor:
        weights = self.prior[y]
        with frozen(model, budget.bn):
            with torch.no_grad():
                logits_clean = model(x)

            def objective(z: Tensor) -> Tensor:
                return ikl_loss(model(z), logits_clean, weights, alpha=self.attack_alpha,
                                beta=self.attack_beta, gamma=self.attack_gamma,
                                version=self.version)

            return maximise(objective, x, **budget.attack_kwargs())

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> StepOutput:
        return self._loss(model, x, y, x_adv, self.views)

    def _loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor,
              views: int) -> StepOutput:
        """docs/reference.md#two-views: one forward of all 2B images per branch, the robust
        terms averaged per view and the augmented view's weighted by `aug_weight`; the hard-label
        CE over all rows; the prior accumulates the basic view only (`observe`)."""
        model.train()
        logits_adv = model(x_adv)
        logits_clean = model(x)
        weights, n = self.prior[y], len(y) // views
        wmse = sce = 0.0
        for view, scale in enumerate((1.0, self.aug_weight)[:views]):
            rows = slice(view * n, (view + 1) * n)
            ikl = ikl_terms(logits_adv[rows], logits_clean[rows], weights[rows],
                            gamma=self.gamma, version=self.version)
            wmse, sce = wmse + scale * ikl["wmse"], sce + scale * ikl["sce"]
        terms = {"ce": self.cross_entropy(logits_clean, y), "wmse": self.beta * wmse,
                 "sce": self.alpha * sce}
        return StepOutput(terms, logits_adv=logits_adv, logits_clean=logits_clean)

    def awp_loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
        if self.views > 1 and self.awp_views == "joint":
            return self._loss(model, x, y, x_adv, views=1).total()  # all rows as one view
        return super().awp_loss(model, x, y, x_adv)

    @torch.no_grad()
    def observe(self, y: Tensor, out: StepOutput) -> None:
        n = len(y) // self.views  # the basic view
        probs = F.softmax(out.logits_clean[:n].detach().float() / self.temperature, dim=1)
        self.prior_sum.index_add_(0, y[:n], probs.to(self.prior_sum.dtype))

    def on_epoch_end(self) -> None:
        update_class_prior(self.prior, self.prior_sum, self.prior_momentum)
