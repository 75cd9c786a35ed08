"""AutoAttack's own warnings ("flags", Croce & Hein, ICML 2020, arXiv 2003.01690, and the flags
documentation of the fra31/auto-attack repository), computed the way pyautoattack's `checks`
module computes them, but from the whole evaluation rather than from one
`run_standard_evaluation` call.

eval.autoattack runs one attack stage per call, so AutoAttack only ever sees {clean, <stage>} and
its Square check (which needs more than two entries) can never fire; its other checks see only
the first batch of each call. Here every check runs once per evaluation and records its numbers:

- square: Square (black-box) lowered the robust accuracy by more than 0.2 percentage points below
  the lowest accuracy the white-box stages reached (`check_square_sr`, alpha = 0.002).
- randomized: 5 forward passes of the first batch disagree (a prediction changes, or the L2
  distance between L2-normalised logits exceeds 1e-4; `check_randomized`).
- output_range: the outputs look like probabilities (all in [0, 1] and rows summing to 1 within
  1e-5; `check_range_output`): the attacks need logits.
- zero_gradients: points whose DLR-loss input gradient at a random start in the eps-ball is all
  zero (`check_zero_gradients`, run by APGD on its DLR losses; any such point raises it). Here it
  runs on every clean-correct point of the evaluation (the points the attacks work on).
- dynamic: the forward pass calls autograd (`grad`, `backward`, `_make_grads`), i.e. the defence
  optimises at inference (`check_dynamic`).
- n_classes: too few classes for the (targeted) DLR loss or for the number of target classes
  (`check_n_classes`).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attacks.pgd import random_start

from .common import autoattack_norm

SQUARE_ALPHA = 0.002      # fractions, as check_square_sr: 0.2 percentage points
RANDOMIZED_ALPHA = 1e-4   # check_randomized
RANDOMIZED_PASSES = 5
RANGE_ALPHA = 1e-5        # check_range_output
AUTOGRAD_CALLS = ("grad", "backward", "_make_grads")  # check_dynamic


def square_flag(stages: Sequence[dict]) -> dict:
    """`stages`: [{'attack', 'robust_acc' (percent, after that stage)}] in the order run."""
    accs = {s["attack"]: s["robust_acc"] for s in stages}
    white = [v for k, v in accs.items() if k != "square"]
    if "square" not in accs or not white:
        return {"raised": False, "ran": False,
                "message": "Square did not run after white-box stages"}
    drop = min(white) - accs["square"]
    raised = drop > 100 * SQUARE_ALPHA
    return {"raised": raised, "ran": True, "white_box_acc": min(white),
            "square_acc": accs["square"], "drop_pp": round(drop, 4),
            "threshold_pp": 100 * SQUARE_ALPHA,
            "message": (f"Square lowered the robust accuracy by {drop:.2f} pp below the white-box "
                        f"stages (> {100 * SQUARE_ALPHA:.1f} pp): the white-box attacks may be "
                        f"foiled by gradient masking; run Square with more queries and restarts, "
                        f"or an adaptive attack") if raised else "Square found nothing new"}


def _batched(model: nn.Module, x: Tensor, batch_size: int, device) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(x), batch_size)])


def randomized_flag(model: nn.Module, x: Tensor, y: Tensor, device) -> dict:
    outputs, correct = [], []
    with torch.no_grad():
        for _ in range(RANDOMIZED_PASSES):
            out = model(x.to(device)).float().cpu()
            correct.append(int((out.argmax(1) == y).sum()))
            outputs.append(out / (out.norm(dim=1, keepdim=True) + 1e-10))
    diff = max((outputs[i] - outputs[j]).norm(dim=1).max().item()
               for i in range(RANDOMIZED_PASSES) for j in range(i + 1, RANDOMIZED_PASSES))
    raised = len(set(correct)) > 1 or diff > RANDOMIZED_ALPHA
    return {"raised": raised, "max_normalized_logit_diff": diff, "threshold": RANDOMIZED_ALPHA,
            "correct_per_pass": correct, "images": len(x),
            "message": "the outputs change between identical forward passes: a randomised "
                       "defence needs version 'rand'" if raised else "deterministic outputs"}


def output_range_flag(out: Tensor) -> dict:
    probs = bool(out.max() < 1 + RANGE_ALPHA and out.min() > -RANGE_ALPHA
                 and ((out.sum(-1) - 1).abs() < RANGE_ALPHA).all())
    return {"raised": probs, "min": out.min().item(), "max": out.max().item(),
            "threshold": RANGE_ALPHA,
            "message": "the outputs are a probability distribution: attack the logits"
                       if probs else "the outputs are logits"}


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example DLR loss (Croce & Hein 2020, eq. 4): -(z_y - max_{i!=y} z_i) /
    (z_pi1 - z_pi3 + 1e-12), z sorted decreasingly as z_pi1 >= z_pi2 >= ..."""
    z, _ = logits.sort(dim=1, descending=True)
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(),
                               float("-inf")).amax(1)
    return -(true - other) / (z[:, 0] - z[:, 2] + 1e-12)


def zero_gradient_flag(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str,
                       batch_size: int, device, seed: int) -> dict:
    """Points (among x, y) whose DLR input gradient at a seeded random start is all zero or not
    finite."""
    generator = torch.Generator().manual_seed(seed)
    zero = nonfinite = 0
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in grads:
        p.requires_grad_(False)
    try:
        for i in range(0, len(x), batch_size):
            xb = random_start(x[i:i + batch_size], eps, norm, "uniform",
                              generator=generator).to(device).requires_grad_(True)
            yb = y[i:i + batch_size].to(device)
            (g,) = torch.autograd.grad(dlr_loss(model(xb).float(), yb).sum(), xb)
            g = g.flatten(1)
            finite = torch.isfinite(g).all(1)
            nonfinite += int((~finite).sum())
            zero += int(((g.abs().sum(1) == 0) & finite).sum())
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
    n = len(x)
    raised = zero + nonfinite > 0
    return {"raised": raised, "zero": zero, "nonfinite": nonfinite, "points": n,
            "share": (zero + nonfinite) / n if n else 0.0, "threshold": 0,
            "message": f"{zero + nonfinite} of {n} points have a zero or non-finite gradient: "
                       f"gradient-based attacks are unreliable here" if raised else
                       "every point has a usable gradient"}


def dynamic_flag(model: nn.Module, x: Tensor, device) -> dict:
    calls = {name: 0 for name in AUTOGRAD_CALLS}

    def trace(frame, event, arg):
        if event == "call" and frame.f_code.co_name in calls:
            calls[frame.f_code.co_name] += 1

    previous = sys.gettrace()  # a coverage tracer, say: put it back afterwards
    sys.settrace(trace)
    try:
        model(x.to(device))
    finally:
        sys.settrace(previous)
    raised = any(calls.values())
    return {"raised": raised, "autograd_calls": calls,
            "message": "the forward pass runs autograd: a dynamic defence, which AutoAttack "
                       "may not evaluate well" if raised else "static forward pass"}


def n_classes_flag(n_classes: int, stages: Sequence[str], apgd_targets: int,
                   fab_targets: int) -> dict:
    problems = []
    if {"apgd-dlr", "apgd-t"} & set(stages):
        if n_classes <= 3:
            problems.append(f"{n_classes} classes are too few for the "
                            f"{'DLR' if n_classes <= 2 else 'targeted DLR'} loss")
        elif "apgd-t" in stages and apgd_targets + 1 > n_classes:
            problems.append(f"APGD-T uses {apgd_targets} target classes of {n_classes - 1}")
    if "fab-t" in stages and fab_targets + 1 > n_classes:
        problems.append(f"FAB-T uses {fab_targets} target classes of {n_classes - 1}")
    return {"raised": bool(problems), "n_classes": n_classes,
            "message": "; ".join(problems) or "enough classes for the targeted attacks"}


def compute_flags(model: nn.Module, x: Tensor, y: Tensor, correct: Tensor, stages: list[dict],
                  *, eps: float, norm: str, version: str, batch_size: int, device,
                  seed: int) -> dict:
    """Every AutoAttack check for an evaluation of (x, y) (CPU tensors); `correct` (bool) marks
    the clean-correct points; `stages` as in the result JSON; `norm`: attacks.pgd.NORMS."""
    from pyautoattack import AutoAttack

    first_x, first_y = x[:batch_size], y[:batch_size]
    flags = {"square": square_flag(stages)}
    if version != "rand":  # AutoAttack skips it for randomised defences too
        flags["randomized"] = randomized_flag(model, first_x, first_y, device)
    out = _batched(model, first_x, batch_size, device)
    flags["output_range"] = output_range_flag(out)
    flags["zero_gradients"] = zero_gradient_flag(model, x[correct], y[correct], eps=eps,
                                                 norm=norm, batch_size=batch_size,
                                                 device=device, seed=seed)
    flags["dynamic"] = dynamic_flag(model, first_x, device)
    aa = AutoAttack(nn.Identity(), version=version, norm=autoattack_norm(norm), eps=eps)
    flags["n_classes"] = n_classes_flag(out.shape[-1], [s["attack"] for s in stages],
                                        aa.apgd_targeted.n_target_classes,
                                        aa.fab.n_target_classes)
    return flags


def raised(flags: dict) -> list[str]:
    """The names of the raised flags, in the order they were checked."""
    return [name for name, f in flags.items() if f.get("raised")]
