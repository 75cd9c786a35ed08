"""Per-epoch schedules: the learning rate and the training attack's budget. Epochs are 1-based."""
from __future__ import annotations

import math
from dataclasses import dataclass

from attacks.single_step import DEFAULT_STEP_FACTOR

LR_SCHEDULES = ("cosine", "piecewise", "onecycle", "constant")
ATTACK_SCHEDULES = ("fixed", "dkl_high", "dkl_high_intended")


def _cos_interp(start: float, end: float, frac: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def _onecycle_phase(step: int, total: int, pct: float) -> tuple[int, float]:
    """Phase (0 warm-up, 1 anneal) and progress in it of torch's OneCycleLR at `step` of
    `total`, stepped once per epoch as Wang et al. do."""
    warm_end = pct * total - 1
    if warm_end > 0 and step <= warm_end:
        return 0, step / warm_end
    # As in torch, the anneal phase starts at warm_end even when that is negative (short runs).
    return 1, (step - warm_end) / max(total - 1 - warm_end, 1e-12)


def _onecycle(lr: float, step: int, total: int, pct: float) -> float:
    """torch's OneCycleLR learning rate (cosine, two phases, div 25, final div 1e4)."""
    phase, frac = _onecycle_phase(step, total, pct)
    initial, final = lr / 25.0, lr / 25.0 / 1e4
    return _cos_interp(initial, lr, frac) if phase == 0 else _cos_interp(lr, final, frac)


def momentum_at(optim_cfg: dict, epoch: int) -> float:
    """SGD momentum for 1-based `epoch`: optim.momentum, or with optim.cycle_momentum = [low,
    high] under the onecycle schedule torch's OneCycleLR cycling (Wang et al. use its default
    [0.85, 0.95]): from high down to low over the warm-up while the lr rises, back to high over
    the anneal (cosine in both phases)."""
    cycle = optim_cfg["cycle_momentum"]
    if cycle is None:
        return optim_cfg["momentum"]
    low, high = cycle
    phase, frac = _onecycle_phase(epoch - 1, optim_cfg["epochs"], optim_cfg["onecycle_pct"])
    return _cos_interp(high, low, frac) if phase == 0 else _cos_interp(low, high, frac)


def lr_at(optim_cfg: dict, epoch: int) -> float:
    """Learning rate for 1-based `epoch` of `optim.epochs`.

    cosine: lr * (1 + cos(pi * e / (E + 1))) / 2, the DKL reference formula (never exactly 0);
    piecewise: lr * lr_decay ** (number of milestones m with e >= m); onecycle: see `_onecycle`;
    constant: lr. A linear warm-up lr * e / W replaces the first W - 1 epochs, and cosine then
    runs over the remaining epochs, as in the reference's warm-up variant.
    """
    lr, total, warm = optim_cfg["lr"], optim_cfg["epochs"], optim_cfg["warmup_epochs"]
    kind = optim_cfg["schedule"]
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown optim.schedule {kind!r}; valid: {', '.join(LR_SCHEDULES)}")
    if kind == "onecycle":
        return _onecycle(lr, epoch - 1, total, optim_cfg["onecycle_pct"])
    if warm > 0 and epoch < warm:
        return lr * epoch / warm
    if kind == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warm) / (total - warm + 1)))
    if kind == "piecewise":
        return lr * optim_cfg["lr_decay"] ** sum(epoch >= m for m in optim_cfg["milestones"])
    return lr


@dataclass(frozen=True)
class AttackBudget:
    """One epoch's inner-maximisation settings (radius and step on the [0,1] scale; `bn`: how
    BatchNorm normalises during the attack, attacks.BN_MODES; `kind`: attacks.single_step.KINDS,
    `k`: the N-FGSM noise radius in units of eps)."""
    eps: float
    step_size: float
    steps: int
    norm: str = "linf"
    init: str = "normal"
    clamp_init: bool = True
    bn: str = "eval"
    kind: str = "pgd"
    k: float = 2.0

    def pgd_kwargs(self) -> dict:
        return dict(eps=self.eps, step_size=self.step_size, steps=self.steps, norm=self.norm,
                    init=self.init, clamp_init=self.clamp_init)

    def attack_kwargs(self) -> dict:
        """Keyword arguments of attacks.maximise."""
        return dict(self.pgd_kwargs(), kind=self.kind, k=self.k)


def attack_budget(attack_cfg: dict, epoch: int, epochs: int) -> AttackBudget:
    """The training attack for 1-based `epoch` of `epochs`.

    attack.kind other than pgd: one step of attack.step_factor * eps_t
    (docs/reference.md#single-step-attacks); the schedule is then fixed (checked at load).

    eps_ramp: eps_t = eps * epoch / epochs (DKL's curriculum), else eps_t = eps.
    fixed: `steps` steps of `step_size` (scaled by eps_t / eps). dkl_high: 5 steps of eps_t / 2 in
    every epoch, which is what the DKL code runs: its 'high' budget is a chain of independent `if`s
    whose last branch always wins (docs/reference.md#attack-schedules). dkl_high_intended: the
    chain read as if/elif with thresholds scaled by epochs / 200: 2 steps of eps_t, 3 of
    2 eps_t / 3, 4 of eps_t / 2, 5 of eps_t / 2 over the four quarters of training.
    """
    eps, kind = attack_cfg["eps"], attack_cfg["schedule"]
    scale = epoch / epochs if attack_cfg["eps_ramp"] else 1.0
    eps_t = eps * scale
    attack = attack_cfg["kind"]
    if attack != "pgd":  # single-step: one step of step_factor * eps_t (null: the paper's)
        factor = attack_cfg["step_factor"]
        factor = DEFAULT_STEP_FACTOR[attack] if factor is None else factor
        return AttackBudget(eps=eps_t, step_size=factor * eps_t, steps=1, norm=attack_cfg["norm"],
                            bn=attack_cfg["bn"], kind=attack, k=attack_cfg["n_fgsm_k"])
    if kind == "fixed":
        steps, step_size = attack_cfg["steps"], attack_cfg["step_size"] * scale
    elif kind == "dkl_high":
        steps, step_size = 5, eps_t / 2
    elif kind == "dkl_high_intended":
        quarter = epochs / 200
        if epoch <= 50 * quarter:
            steps, step_size = 2, eps_t
        elif epoch <= 100 * quarter:
            steps, step_size = 3, 2 * eps_t / 3
        elif epoch <= 150 * quarter:
            steps, step_size = 4, eps_t / 2
        else:
            steps, step_size = 5, eps_t / 2
    else:
        raise ValueError(f"unknown attack.schedule {kind!r}; valid: {', '.join(ATTACK_SCHEDULES)}")
    return AttackBudget(eps=eps_t, step_size=step_size, steps=steps, norm=attack_cfg["norm"],
                        init=attack_cfg["init"], clamp_init=attack_cfg["clamp_init"],
                        bn=attack_cfg["bn"])
