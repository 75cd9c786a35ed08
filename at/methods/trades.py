"""TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
ICML 2019, arXiv 1901.08573): CE(f(x), y) + beta * KL(p(x) || p(x_adv)); the attack maximises
the KL."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from attacks import frozen, maximise
from errors import ConfigError

from ..bn_stats import BNUpdate
from ..losses import trades_kl
from ..schedules import AttackBudget
from .base import Method, StepOutput

BRANCHES = ("clean", "adv")


def parse_forwards(spec: str, key: str, required: tuple[str, ...] = BRANCHES) -> tuple[str, ...]:
    """'clean,adv,clean' -> ('clean', 'adv', 'clean'); ValueError (one line) for a bad spec."""
    order = tuple(part.strip() for part in str(spec).split(","))
    if any(b not in BRANCHES for b in order) or any(b not in order for b in required):
        raise ConfigError(f"{key} must be a comma-separated order of the train-mode forwards "
                         f"'clean' and 'adv' (each of {', '.join(required)} at least once), "
                         f"e.g. 'clean,adv,clean'; got {spec!r}")
    return order


class TRADES(Method):
    """BN: eval mode during the attack, whose clean logits are computed once per batch (the
    reference recomputes them at every step, with identical results in eval mode).

    Outer pass: `forwards` is the order of the reference's train-mode forwards, which decides the
    BatchNorm running statistics (the gradients do not depend on it: in train mode two forwards of
    the same batch at the same weights give the same logits, so each branch is computed once):

    * ``clean,adv,clean``: Zhang et al.'s ``trades_loss`` (CE forward, then both KL arguments);
    * ``adv,clean,clean``: the TRADES-AWP repository (Wu et al. 2020);
    * ``adv,clean``: the DKL repository's TRADES baseline (and LBGAT's robust model);
    * ``clean,adv``: Wang et al. 2023 (DM-Improves-AT), one forward per branch.

    A repeated branch costs no forward: its running-statistics update is replayed
    (at/bn_stats.py).
    """

    def __init__(self, num_classes: int, beta: float = 6.0, forwards: str = "clean,adv,clean",
                 label_smoothing: float = 0.0):
        super().__init__(num_classes, label_smoothing)
        self.beta = beta
        self.forwards = parse_forwards(forwards, f"method.{self.config_name}.forwards",
                                       self.required_forwards(beta))

    config_name = "trades"

    def required_forwards(self, beta: float) -> tuple[str, ...]:
        """Branches whose logits the loss needs (each must be in `forwards`)."""
        return BRANCHES

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, budget: AttackBudget) -> Tensor:
        with frozen(model, budget.bn):
            with torch.no_grad():
                logits_clean = model(x)
            return maximise(lambda z: trades_kl(model(z), logits_clean), x,
                            **budget.attack_kwargs())

    def run_forwards(self, model: nn.Module, x: Tensor, x_adv: Tensor,
                     grad: dict[str, bool] | None = None) -> dict[str, Tensor]:
        """Train-mode logits of each branch in `forwards` order; a repeated branch replays its
        BatchNorm update instead of a second forward. `grad[branch] = False` runs that branch
        without a graph (it is only there for the running statistics)."""
        model.train()
        logits: dict[str, Tensor] = {}
        updates: dict[str, BNUpdate] = {}
        for i, branch in enumerate(self.forwards):
            if branch in logits:
                updates[branch].replay()
                continue
            repeated = branch in self.forwards[i + 1:]
            update = BNUpdate(model) if repeated else None
            with torch.set_grad_enabled((grad or {}).get(branch, True)
                                        and torch.is_grad_enabled()):
                logits[branch] = model(x if branch == "clean" else x_adv)
            if update is not None:
                update.done()
                updates[branch] = update
        return logits

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> StepOutput:
        logits = self.run_forwards(model, x, x_adv)
        logits_clean, logits_adv = logits["clean"], logits["adv"]
        terms = {"ce": self.cross_entropy(logits_clean, y),
                 "kl": self.beta * trades_kl(logits_adv, logits_clean)}
        return StepOutput(terms, logits_adv=logits_adv, logits_clean=logits_clean)
