"""Images per second of each AutoAttack stage (standard version, Linf 8/255) for a model.

Each stage runs, as in AutoAttack, on the points still robust after the previous stages, with
the batch size eval.autoattack would choose (eval.common.auto_batch_size). How many points reach
the later stages depends on the model's robustness (a trained robust model keeps ~60 % through
APGD-CE on CIFAR-10, a random one almost none), which is why the points per stage are reported.
Given a run (or checkpoint) the stages attack its test images; otherwise random images labelled
with the model's own predictions, so that every image enters the first stage.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from at.target import load_target
from eval.autoattack import stage_names
from eval.common import auto_batch_size, load_test_data


def time_stages(model: nn.Module, n: int, device: torch.device, target: str | None = None,
                weights: str = "best", eps: float = 8 / 255, seed: int = 0) -> dict:
    from pyautoattack import AutoAttack

    if target is not None:
        t = load_target(target, weights, device=device)
        model = t.model
        x, y = load_test_data(t, n)
    else:
        x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    model.eval()
    batch_size = auto_batch_size(model, device)
    correct = torch.ones(len(x), dtype=torch.bool)
    with torch.no_grad():
        predicted = torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu()
                               for i in range(0, len(x), batch_size)])
    if target is None:
        y = predicted
    else:
        correct = predicted == y
    adversary = AutoAttack(model, version="standard", norm="Linf", eps=eps, seed=seed,
                           device=device)
    robust = correct.clone()
    stages = []
    for stage in stage_names("standard", "Linf"):
        idx = robust.nonzero().flatten()
        seconds = 0.0
        if len(idx):
            adversary.attacks_to_run = [stage]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            _, y_adv = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            robust[idx] = y_adv.cpu() == y[idx]
        stages.append({"attack": stage, "points": len(idx), "seconds": round(seconds, 3),
                       "images_per_s": round(len(idx) / seconds, 2) if seconds else None,
                       "robust_after": int(robust.sum())})
    return {"n": len(x), "target": target, "weights": weights if target else None,
            "clean_correct": int(correct.sum()), "batch_size": batch_size, "stages": stages}


# The standard (Linf) schedule of each stage for a point that stays robust, and the attribute of
# pyautoattack's attack object that sets it: (attack attribute, iterations attribute, full count,
# target classes).
_SCHEDULE = {"apgd-ce": ("apgd", "n_iter", 100, 1), "apgd-t": ("apgd_targeted", "n_iter", 100, 9),
             "fab-t": ("fab", "n_iter", 100, 9), "square": ("square", "n_queries", 5000, 1)}


def stage_costs(model: nn.Module, n: int, device: torch.device, *, iterations: int = 5,
                queries: int = 25, eps: float = 1e-5, seed: int = 0) -> dict:
    """Seconds per image of each standard AutoAttack stage for a point that stays robust.

    Every stage runs on all `n` images (random, labelled with the model's own predictions) at a
    radius so small that no point is broken, so each point runs every iteration, as the robust
    points of a real evaluation do. The schedule is shortened to one target class and k, then 2k
    iterations (k = `iterations` for APGD and FAB, `queries` for Square); the difference of the
    two times gives the cost of one iteration, and the standard schedule's cost per image is
    (time at k + per-iteration cost x (K - k)) x targets / n, with K = 100 iterations (5000 Square
    queries) and 9 target classes for APGD-T and FAB-T: the fixed cost of a call (AutoAttack's
    checks, the first forward) is counted once per target class, a slight overestimate.
    Returns {"n", "eps", "batch_size", "stages": [{attack, points, iterations, seconds,
    seconds_per_iteration, robust_after, full_schedule_seconds_per_image}, ...]}.
    """
    from pyautoattack import AutoAttack

    model.eval()
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    batch_size = min(n, auto_batch_size(model, device))
    with torch.no_grad():
        y = torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu()
                       for i in range(0, n, batch_size)])
    adversary = AutoAttack(model, version="standard", norm="Linf", eps=eps, seed=seed,
                           device=device)
    stages = []
    for stage in stage_names("standard", "Linf"):
        attr, knob, full, targets = _SCHEDULE[stage]
        attack = getattr(adversary, attr)
        if targets > 1:
            attack.n_target_classes = 1
        adversary.attacks_to_run = [stage]
        k = queries if knob == "n_queries" else iterations
        seconds, robust = [], n
        for count in (k, 2 * k):
            setattr(attack, knob, count)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
            robust = min(robust, int((y_adv.cpu() == y).sum()))
        # Timing noise can make the difference non-positive on a tiny problem: then the whole
        # time at 2k is taken as iterations (an overestimate).
        per_iteration = (seconds[1] - seconds[0]) / k
        if per_iteration <= 0:
            per_iteration = seconds[1] / (2 * k)
        full_seconds = (seconds[0] + per_iteration * (full - k)) * targets
        stages.append({"attack": stage, "points": n, "iterations": [k, 2 * k],
                       "seconds": [round(t, 3) for t in seconds],
                       "seconds_per_iteration": per_iteration, "robust_after": robust,
                       "full_schedule_seconds_per_image": full_seconds / n})
    return {"n": n, "eps": eps, "batch_size": batch_size, "stages": stages}
