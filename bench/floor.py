"""The essential-pass floor of bench.at_step: exactly the forward/backward passes a method needs
per training step, on a batch already on the device, and nothing else (no data loading, no
augmentation, no loss arithmetic beyond a sum, no projection, no optimizer update, no
statistics). Passes per step with K attack steps (docs/performance.md#step-cost):

    natural logits once (eval, no grad)            trades, ikl_at    1 F
    K x (eval forward + input-only backward)       all but standard  2K F
    AWP: train forwards + weight backward          awp on            as the outer step
    outer: train forwards + weight backward        1 forward (standard, pgd_at) or 2 (trades,
                                                   ikl_at), each backward ~2 F

The same model object, layout and precision as the run it is compared with, so the ratio
ours / floor is the price of everything around the passes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from at import speed
from attacks import frozen

NATURAL_TARGET = {"standard": False, "pgd_at": False, "trades": True, "ikl_at": True}
OUTER_FORWARDS = {"standard": 1, "pgd_at": 1, "trades": 2, "ikl_at": 2}


def forward_units(method: str, steps: int, awp: bool) -> int:
    """Forward-equivalents (F) per image and step: forward 1, input-only backward 1, weight
    backward 2 (FlopCounterMode counts, docs/performance.md#step-cost)."""
    attack = 0 if method == "standard" else int(NATURAL_TARGET[method]) + 2 * steps
    outer = 3 * OUTER_FORWARDS[method]
    return attack + outer * (2 if awp else 1)


class FloorStep:
    def __init__(self, model: nn.Module, method: str, steps: int, awp: bool, settings: dict,
                 device: torch.device):
        if method not in NATURAL_TARGET:
            raise ValueError(f"no essential-pass floor for method {method!r}; "
                             f"valid: {', '.join(NATURAL_TARGET)}")
        self.model, self.method, self.steps, self.awp = model, method, steps, awp
        self.settings, self.device = settings, device
        self.weights = [p for p in model.parameters() if p.requires_grad]

    def _outer(self, x: Tensor, x_adv: Tensor) -> Tensor:
        self.model.train()
        inputs = [x_adv, x][:OUTER_FORWARDS[self.method]] if self.method != "standard" else [x]
        return sum(self.model(z).sum() for z in inputs)

    def __call__(self, x: Tensor) -> None:
        s, device = self.settings, self.device
        x_adv = x
        if self.method != "standard":
            with speed.autocast(device, s["attack_precision"]), frozen(self.model):
                if NATURAL_TARGET[self.method]:
                    with torch.no_grad():
                        self.model(x)
                x_adv = x.clone()
                for _ in range(self.steps):
                    x_adv.requires_grad_(True)
                    (grad,) = torch.autograd.grad(self.model(x_adv).sum(), x_adv)
                    x_adv = x_adv.detach()
        with speed.autocast(device, s["update_precision"]):
            if self.awp:
                torch.autograd.grad(self._outer(x, x_adv), self.weights)
            loss = self._outer(x, x_adv)
        for p in self.weights:
            p.grad = None
        loss.backward()
