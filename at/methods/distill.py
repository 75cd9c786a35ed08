"""Knowledge distillation from a frozen teacher: CE(student, y) + a distillation loss by name
(at/kd_losses.py): kd (Hinton), dkd (Zhao et al. 2022), ikl_kd / gkl_kd (Cui et al. 2024,
docs/reference.md#ikl-kd) and wkd_l (Lv et al. 2024, docs/reference.md#wkd-l).

With `inputs: adversarial` it is adversarially robust distillation (Goldblum et al., AAAI 2020,
"ARD"): PGD finds, within the attack budget, images that maximise the student's distillation loss
to the teacher's clean logits, and the student learns on them (the teacher, e.g. a robust run of
this codebase, always sees the clean images).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks import frozen, pgd
from errors import ConfigError

from ..kd_losses import dkd_loss, ikl_kd_terms, kd_loss, wkd_logit_terms
from ..schedules import AttackBudget
from .base import Method, StepOutput, update_class_prior

LOSSES = ("kd", "dkd", "ikl_kd", "gkl_kd", "wkd_l")
WEIGHTS = ("sample", "class_prior")
INPUTS = ("clean", "adversarial")


def load_teacher(path: str, weights: str, arch: str | None, num_classes: int) -> nn.Module:
    """A run directory's (`weights`: best / last / avg) or a bare checkpoint's (`arch` needed)
    model, or torchvision's ImageNet weights (`torchvision:resnet34`), frozen: eval mode, no
    parameter gradients."""
    import models
    from errors import EvalError

    from ..target import load_target
    dataset = None
    if path.startswith(models.TORCHVISION_PREFIX):
        if num_classes != 1000:
            raise ConfigError(f"method.distill.teacher {path}: torchvision's weights predict "
                             f"1000 ImageNet classes, the data has {num_classes}")
        teacher = models.torchvision_model(path)
    else:
        if not Path(path).exists():
            raise ConfigError(f"method.distill.teacher: {path} does not exist (a run directory, "
                             f"a checkpoint file or torchvision:NAME)")
        if not Path(path).is_dir():
            if arch is None:
                raise ConfigError(f"method.distill.teacher {path} is a checkpoint file: set "
                                 f"method.distill.teacher_arch")
            # Which family of networks `arch` names: ImageNet ones for 1000 classes.
            dataset = {1000: "imagenet", 100: "cifar100"}.get(num_classes, "cifar10")
        try:
            teacher = load_target(path, weights, arch, dataset, device="cpu").model
        except EvalError as err:
            raise ConfigError(f"method.distill.teacher: {err}") from None
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        out = teacher.eval()(torch.zeros(1, 3, 32, 32)).shape[1]
    if out != num_classes:
        raise ConfigError(f"method.distill.teacher {path} predicts {out} classes, the data has "
                         f"{num_classes}")
    return teacher


class Distill(Method):
    """BN: the student in train mode on the training inputs; the teacher always in eval mode
    under no_grad (a frozen teacher receives no gradient and keeps its statistics). The teacher
    is a submodule, so it moves with the method and is saved with the run (what was distilled).

    Warm-up: the distillation term is scaled by min(epoch / warmup, 1), epochs 1-based (DKD and
    IKL-KD use 20 on CIFAR-100). With decay_epochs > 0 it is in addition cosine-decayed to 0 over
    the epochs decay_from + 1 ... decay_from + decay_epochs (WKD-L: 150 + 90 on CIFAR-100, 0 +
    100 on ImageNet).
    """

    accumulators = ("prior_sum",)

    def __init__(self, num_classes: int, teacher: str | None = None,
                 teacher_weights: str = "best", teacher_arch: str | None = None,
                 loss: str = "kd", ce_weight: float = 1.0, kd_weight: float = 1.0,
                 warmup: int = 1, temperature: float = 4.0, alpha: float = 1.0,
                 beta: float = 8.0, gamma: float = 1.0, weights: str = "sample",
                 prior_temperature: float = 100.0, cost_matrix: str | None = None,
                 sinkhorn_reg: float = 0.05, sinkhorn_iterations: int = 10,
                 cost_sharpen: float = 1.0, decay_from: int = 0, decay_epochs: int = 0,
                 inputs: str = "clean",
                 label_smoothing: float = 0.0):
        super().__init__(num_classes, label_smoothing)
        for value, valid, key in ((loss, LOSSES, "loss"), (weights, WEIGHTS, "weights"),
                                  (inputs, INPUTS, "inputs")):
            if value not in valid:
                raise ConfigError(f"method.distill.{key} must be one of {', '.join(valid)}, "
                                 f"got {value!r}")
        if teacher is None:
            raise ConfigError("method.distill.teacher is required: a run directory or checkpoint")
        if warmup < 1 or temperature <= 0 or prior_temperature <= 0:
            raise ConfigError("method.distill.warmup must be >= 1 and the temperatures > 0")
        if loss == "wkd_l" and cost_matrix is None:
            raise ConfigError("method.distill.loss=wkd_l needs method.distill.cost_matrix "
                             "(python -m at.kd_cost_matrix)")
        self.uses_attack = inputs == "adversarial"
        self.loss_name, self.ce_weight, self.kd_weight = loss, ce_weight, kd_weight
        self.warmup, self.temperature, self.alpha, self.beta = warmup, temperature, alpha, beta
        self.gamma, self.weights, self.prior_temperature = gamma, weights, prior_temperature
        self.reg, self.iterations = sinkhorn_reg, sinkhorn_iterations
        self.decay_from, self.decay_epochs = decay_from, decay_epochs
        self.teacher = load_teacher(teacher, teacher_weights, teacher_arch, num_classes)
        if cost_matrix is not None:
            from ..cost_matrix import load_cost_matrix
            self.register_buffer("cost", load_cost_matrix(cost_matrix, num_classes,
                                                          cost_sharpen))
        self.register_buffer("prior", torch.full((num_classes, num_classes), 1.0 / num_classes))
        self.register_buffer("prior_sum",
                             torch.zeros(num_classes, num_classes, dtype=torch.float64))
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self.teacher.eval()  # frozen, whatever the trainer asks of the method's modules
        return self

    # ---- the distillation term ---------------------------------------------------------------
    def _factor(self) -> float:
        epoch = int(self.epochs_done) + 1
        factor = min(epoch / self.warmup, 1.0) * self.kd_weight
        if self.decay_epochs > 0 and epoch > self.decay_from:
            progress = min((epoch - self.decay_from) / self.decay_epochs, 1.0)
            factor *= 0.5 * (1 + math.cos(math.pi * progress))
        return factor

    def distill_terms(self, z_s: Tensor, z_t: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The weighted distillation terms (warm-up and weights applied), batch means."""
        f, name = self._factor(), self.loss_name
        if name == "kd":
            return {"kd": f * kd_loss(z_s, z_t, self.temperature)}
        if name == "dkd":
            return {"dkd": f * dkd_loss(z_s, z_t, y, alpha=self.alpha, beta=self.beta,
                                        temperature=self.temperature)}
        if name == "wkd_l":
            terms = wkd_logit_terms(z_s, z_t, y, self.cost, temperature=self.temperature,
                                    reg=self.reg, iterations=self.iterations)
            return {"target": terms["target"], "wd": f * terms["wd"]}
        if self.weights == "class_prior":
            w = self.prior[y]
        else:
            w = F.softmax(z_t.detach().float() / self.prior_temperature, dim=1)
        terms = ikl_kd_terms(z_s, z_t, w, temperature=self.temperature, gamma=self.gamma,
                             version="v1" if name == "ikl_kd" else "v2")
        return {"wmse": f * self.beta * terms["wmse"], "sce": f * self.alpha * terms["sce"]}

    def _teacher_logits(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.teacher(x).float()

    # ---- Method interface -------------------------------------------------------------------
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, budget: AttackBudget) -> Tensor:
        if not self.uses_attack:
            return x
        z_t = self._teacher_logits(x)
        with frozen(model, budget.bn):
            def objective(z: Tensor) -> Tensor:
                return sum(self.distill_terms(model(z), z_t, y).values())
            return pgd(objective, x, **budget.pgd_kwargs())

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> StepOutput:
        model.train()
        z_t = self._teacher_logits(x)
        inputs = x_adv if self.uses_attack else x
        z_s = model(inputs)
        terms = {"ce": self.ce_weight * self.cross_entropy(z_s, y),
                 **self.distill_terms(z_s, z_t, y)}
        logits = {"logits_adv": z_s} if self.uses_attack else {"logits_clean": z_s}
        return StepOutput(terms, **logits, extra={"teacher": z_t})

    @torch.no_grad()
    def observe(self, y: Tensor, out: StepOutput) -> None:
        # The class prior of the GI variant: the teacher's soft predictions per true class.
        probs = F.softmax(out.extra["teacher"] / self.prior_temperature, dim=1)
        self.prior_sum.index_add_(0, y, probs.to(self.prior_sum.dtype))

    def on_epoch_end(self) -> None:
        update_class_prior(self.prior, self.prior_sum)
        self.epochs_done += 1
