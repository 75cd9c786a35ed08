"""Checks of a resolved training config as a whole (values that would fail late, after hours,
or silently mean something else), run once, when the config is loaded (at/config.py), after its
keys and types."""
from __future__ import annotations

import data as datasets
from attacks.pgd import INITS, NORMS, eps_problem
from attacks.single_step import KINDS
from attacks.utils import BN_MODES
from errors import RunError, unknown

from . import averaging, co_guard, early_stop, grad_align, speed
from .config_values import check_values
from .schedules import ATTACK_SCHEDULES, LR_SCHEDULES


def check_config(cfg: dict) -> None:
    """Reject values that would fail late (after hours) or silently mean something else."""
    o, a, e = cfg["optim"], cfg["attack"], cfg["eval"]
    checks = [
        (o["epochs"] >= 1, "optim.epochs must be >= 1"),
        (o["batch_size"] >= 1, "optim.batch_size must be >= 1"),
        (o["lr"] > 0, "optim.lr must be > 0"),
        (0 <= o["warmup_epochs"] <= o["epochs"],
         "optim.warmup_epochs must be in [0, optim.epochs]"),
        (o["schedule"] in LR_SCHEDULES, f"optim.schedule must be one of {', '.join(LR_SCHEDULES)}"),
        (a["schedule"] in ATTACK_SCHEDULES,
         f"attack.schedule must be one of {', '.join(ATTACK_SCHEDULES)}"),
        (a["norm"] in NORMS, f"attack.norm must be one of {', '.join(NORMS)}"),
        (a["init"] in INITS, f"attack.init must be one of {', '.join(INITS)}"),
        (a["bn"] in BN_MODES, f"attack.bn must be one of {', '.join(BN_MODES)}"),
        (a["eps"] >= 0 and a["step_size"] >= 0, "attack.eps and attack.step_size must be >= 0"),
        (a["steps"] >= 0 and e["pgd_steps"] >= 0, "attack.steps and eval.pgd_steps must be >= 0"),
        (e["every"] >= 1 and e["batch_size"] >= 1, "eval.every and eval.batch_size must be >= 1"),
        (e["n_test"] is None or e["n_test"] >= 1, "eval.n_test must be null or >= 1"),
        (e["best_on"] in ("model", "avg"), "eval.best_on must be model or avg"),
        (e["best_on"] == "model" or cfg["avg"]["kind"] != "none",
         "eval.best_on=avg needs weight averaging (avg.kind)"),
        (cfg["log"]["interval"] >= 1, "log.interval must be >= 1"),
        (cfg["model"]["bn_groups"] >= 1, "model.bn_groups must be >= 1"),
        (cfg["model"]["bn_groups"] == 1 or not cfg["model"]["sync_bn"],
         "model.bn_groups > 1 (per-GPU statistics) contradicts model.sync_bn (global statistics)"),
        (cfg["model"]["bn_first_momentum"] is None or
         0 < cfg["model"]["bn_first_momentum"] <= 1,
         "model.bn_first_momentum must be null or in (0, 1]"),
        (_cycle_ok(o["cycle_momentum"], o["schedule"]),
         "optim.cycle_momentum must be null or [low, high] with 0 <= low <= high < 1, and "
         "needs optim.schedule=onecycle"),
        (cfg["awp"]["gamma"] >= 0 and cfg["awp"]["warmup"] >= 0,
         "awp.gamma and awp.warmup must be >= 0"),
        (0 <= cfg["data"]["generated"]["fraction"] <= 1,
         "data.generated.fraction must be in [0, 1]"),
        (cfg["checkpoint"]["every_minutes"] >= 0, "checkpoint.every_minutes must be >= 0"),
        (cfg["train"]["skip_nonfinite"] >= 0, "train.skip_nonfinite must be >= 0"),
    ]
    d = cfg["data"]
    if d["name"] in datasets.FOLDER_DATASETS:
        checks += [
            (d["augment"] in datasets.FOLDER_AUGMENTATIONS,
             f"data.augment for {d['name']} must be one of "
             f"{', '.join(datasets.FOLDER_AUGMENTATIONS)}"),
            (d["second_view"] is None and d["generated"]["path"] is None,
             f"data.second_view and data.generated are for CIFAR, not {d['name']}"),
            (d["image_size"] >= 32 and d["resize_size"] >= d["image_size"],
             "data.image_size must be >= 32 and data.resize_size >= data.image_size"),
            (d["workers"] >= 0, "data.workers must be >= 0"),
            (d["num_classes"] is None or d["num_classes"] >= 2,
             "data.num_classes must be null or >= 2"),
        ]
    else:
        checks.append((d["augment"] in datasets.AUGMENTATIONS,
                       f"data.augment for {d['name']} must be one of "
                       f"{', '.join(datasets.AUGMENTATIONS)}"))
        checks.append((d["num_classes"] is None,
                       f"data.num_classes is for image-file datasets; {d['name']} has "
                       f"{datasets.NUM_CLASSES.get(d['name'])} classes (leave it null)"))
    for ok, message in checks:
        if not ok:
            raise RunError(message)
    _check_attack_kind(cfg)
    side = d["image_size"] if d["name"] in datasets.FOLDER_DATASETS else 32  # CIFAR, digits
    problem = eps_problem("attack.eps", a["eps"], a["norm"], 3 * side * side)
    if problem:
        raise RunError(problem)
    # The sections whose modules check them (ConfigError).
    check_values(cfg)  # names, seed, finite numbers (at/config_values.py)
    speed.check(cfg["speed"])
    averaging.check_config(cfg["avg"])
    early_stop.check_config(cfg)
    grad_align.check_config(cfg["method"])  # method.grad_align
    co_guard.check_config(cfg)  # train.co_guard


def _check_attack_kind(cfg: dict) -> None:
    """attack.kind and the single-step keys (docs/reference.md#single-step-attacks)."""
    a, method = cfg["attack"], cfg["method"]["name"]
    kind = a["kind"]
    if kind not in KINDS:
        raise unknown("attack.kind", kind, KINDS)
    if not a["n_fgsm_k"] > 0:
        raise RunError(f"attack.n_fgsm_k (N-FGSM noise radius / eps) must be > 0, "
                       f"got {a['n_fgsm_k']}")
    factor = a["step_factor"]
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                               or not factor > 0):
        raise RunError(f"attack.step_factor must be null or a number > 0, got {factor!r}")
    if kind == "pgd":
        return
    if method not in co_guard.SINGLE_STEP_METHODS:
        raise RunError(f"attack.kind={kind}: method {method} has no single-step form (one of "
                       f"{', '.join(co_guard.SINGLE_STEP_METHODS)})")
    if a["norm"] != "linf" or a["schedule"] != "fixed":
        raise RunError(f"attack.kind={kind} is a linf attack with a fixed schedule; got "
                       f"attack.norm={a['norm']}, attack.schedule={a['schedule']}")


def _cycle_ok(cycle, schedule: str) -> bool:
    if cycle is None:
        return True
    return (schedule == "onecycle" and isinstance(cycle, list) and len(cycle) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cycle)
            and 0 <= cycle[0] <= cycle[1] < 1)
