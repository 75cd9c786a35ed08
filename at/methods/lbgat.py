"""LBGAT (Cui et al., "Learnable Boundary Guided Adversarial Training", ICCV 2021,
arXiv 2011.11164): a natural classifier g is trained jointly with the robust model f, and f's
adversarial logits are pulled towards g's clean logits:
MSE(f(x_adv), g(x)) + CE(g(x), y) + beta * KL(p_f(x) || p_f(x_adv)); LBGAT0 is beta = 0."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

import models

from ..losses import trades_kl
from .base import StepOutput
from .trades import TRADES


class LBGAT(TRADES):
    """The natural model is a submodule, so it is saved with the method's state and trained by
    the same optimizer. BN: the robust model is attacked as by TRADES (eval mode, KL objective,
    clean logits computed once); the natural model always runs in train mode (as in the
    reference). Nothing is detached: g learns from the MSE and its CE, f from the MSE and the KL.

    `forwards` is the robust model's train-mode forwards, as for TRADES. The reference runs
    f(x_adv), then f(x) even for LBGAT0, where the clean logits are unused: that forward only
    feeds clean batches into f's BatchNorm running statistics, and here it runs without a graph.
    ``adv`` alone (LBGAT0 only) skips it: f's running statistics then hold no clean batch.
    """

    config_name = "lbgat"

    def __init__(self, num_classes: int, beta: float = 0.0,
                 natural_model: str = "preact-resnet18", forwards: str = "adv,clean",
                 label_smoothing: float = 0.0):
        super().__init__(num_classes, beta, forwards, label_smoothing)
        self.natural = models.build_model(natural_model, num_classes)

    def required_forwards(self, beta: float) -> tuple[str, ...]:
        return ("adv", "clean") if beta != 0 else ("adv",)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> StepOutput:
        self.natural.train()
        logits = self.run_forwards(model, x, x_adv, grad={"clean": self.beta != 0})
        logits_adv = logits["adv"]
        logits_natural = self.natural(x)
        terms = {"mse": F.mse_loss(logits_adv, logits_natural),
                 "ce_natural": self.cross_entropy(logits_natural, y)}
        logits_clean = None
        if self.beta != 0:
            logits_clean = logits["clean"]
            terms["kl"] = self.beta * trades_kl(logits_adv, logits_clean)
        return StepOutput(terms, logits_adv=logits_adv, logits_clean=logits_clean,
                          extra={"logits_natural": logits_natural})
