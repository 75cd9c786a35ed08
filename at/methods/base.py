"""The interface every training method implements; the trainer knows nothing else about methods.

A method owns the inner maximisation (`perturb`) and the outer loss (`loss`), and may keep state
(buffers, or extra trainable modules) that is saved with the run through its `state_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from errors import ConfigError

from .. import distributed
from ..schedules import AttackBudget


@dataclass
class StepOutput:
    """What `Method.loss` returns: weighted loss terms (their sum is minimised) and the logits the
    trainer and the method's statistics need. Terms are batch means."""
    terms: dict[str, Tensor]
    logits_adv: Tensor | None = None
    logits_clean: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def total(self) -> Tensor:
        return torch.stack(list(self.terms.values())).sum()


class Method(nn.Module):
    """Base class. Subclasses document their BatchNorm policy: it changes the numbers."""

    uses_attack = True  # False for methods that never call an attack (standard training)
    # Buffers that sum per-rank contributions within an epoch (reduced in on_epoch_end); a run
    # resumed inside an epoch on another number of ranks adds them up on rank 0.
    accumulators: tuple[str, ...] = ()
    # Methods that weight a second, augmented view of the batch separately (data.second_view).
    supports_views = False
    # Views per batch, fixed for a run and set once by build_method: with 2 every batch is
    # [basic view; augmented view] of the same images.
    views = 1

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"method.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes, self.label_smoothing = num_classes, label_smoothing

    def cross_entropy(self, logits: Tensor, y: Tensor) -> Tensor:
        """Batch-mean CE against labels smoothed over all C classes, (1 - ls) onehot + ls / C,
        which is the label-smoothed CE of Wang et al. 2023 (ls = 0.1 there, 0 in DKL)."""
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, budget: AttackBudget) -> Tensor:
        """Inner maximisation: adversarial images for the batch (model left as it was found)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> StepOutput:
        """Outer loss at the current weights. Must not change method state, so that a wrapper
        (e.g. adversarial weight perturbation) may call it more than once per step. With
        self.views = 2 the batch is [basic view; augmented view] of the same images."""
        raise NotImplementedError

    def awp_loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
        """The scalar adversarial weight perturbation climbs (at/awp.py); by default the outer
        loss. Must not change method state (like `loss`)."""
        return self.loss(model, x, y, x_adv).total()

    def observe(self, y: Tensor, out: StepOutput) -> None:
        """Called once per optimisation step with the outer pass's outputs (statistics)."""

    def on_epoch_end(self) -> None:
        """Called after the last step of every epoch (e.g. to finalise a class prior)."""


@torch.no_grad()
def update_class_prior(prior: Tensor, prior_sum: Tensor, momentum: float = 1.0) -> None:
    """End of an epoch: prior <- m * row-normalised prior_sum + (1 - m) * prior, in place, and
    prior_sum <- 0. prior_sum (C x C, row c = sum of soft predictions over class-c images) is
    first summed over ranks: each rank saw its share of the epoch, so the sums over ranks give
    exactly the single-process prior. A class absent from the epoch keeps its previous row."""
    distributed.all_reduce_sum_(prior_sum)
    counts = prior_sum.sum(dim=1, keepdim=True)
    fresh = torch.where(counts > 0, prior_sum / counts.clamp_min(1e-300),
                        prior.to(prior_sum.dtype))
    prior.copy_((momentum * fresh + (1 - momentum) * prior.to(fresh.dtype)).to(prior.dtype))
    prior_sum.zero_()
