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

from eval.autoattack import stage_names
from eval.common import auto_batch_size, load_target, load_test_data


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
