"""A gradient-masking audit: the sanity checks of Carlini et al. 2019 ("On evaluating adversarial
robustness", arXiv 1902.06705, and its checklist), Athalye, Carlini & Wagner
2018 (ICML, arXiv 1802.00420, §3.1 "identifying obfuscated and masked gradients") and
AutoAttack's flags (Croce & Hein 2020, arXiv 2003.01690), run on one checkpoint.

    python -m eval.audit runs/cifar10_ikl_at --n-ex 1000 --surrogate runs/cifar10_standard

Writes <out_dir>/audit_<norm>_eps<eps>_n<images>_<weights>.json (audit-quick_... with --quick;
each setting its own file): {"verdict": "pass" | "warn", "checks": [{"name", "status", "value",
"threshold", "explanation"}], ...} and robustness_<weights>.png, prints a table, exits 0 on
either verdict (3 on "warn" with --strict). Each check, its threshold and its source are listed
in `CHECKS` and explained in docs/reporting.md. --quick shrinks every attack budget (for tests and
smoke runs; not for a paper).
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from at.errors import USER_ERRORS
from at.errors import report as report_error
from at.evaluate import correct
from attacks import frozen, pgd
from attacks.pgd import eps_problem

from . import aa_flags
from . import autoattack as aa_eval
from .common import (
    DEFAULT_EPS,
    EvalError,
    Target,
    add_target_arguments,
    check_eps,
    check_writable,
    load_target,
    load_test_data,
    parse_eps,
    provenance,
    resolve_batch_size,
    target_from_arguments,
    write_json,
)
from .precision import add_tf32_argument, evaluation_precision
from .results import audit_name

NORMS = {"Linf": "linf", "L2": "l2", "L1": "l1"}
SWEEP_FACTORS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # x eps; 8 x 8/255 = 64/255 under Linf


@dataclass(frozen=True)
class Budget:
    pgd_steps: int = 10          # the quick white-box number (PGD-10)
    strong_steps: int = 100      # convergence: PGD-100 ...
    restarts: int = 5            # ... with 5 random restarts
    unbounded_steps: int = 100
    transfer_steps: int = 100
    # None: the whole standard AutoAttack through eval.autoattack (its JSON and flags are
    # written too); else APGD-CE then APGD-T with `aa_iters` iterations and `aa_targets` target
    # classes (a screening budget: AutoAttack's flags except Square's still run).
    aa_iters: int | None = None
    aa_targets: int = 9


FULL = Budget()
QUICK = Budget(pgd_steps=5, strong_steps=20, restarts=2, unbounded_steps=20, transfer_steps=20,
               aa_iters=20, aa_targets=3)

# name -> (threshold, unit, source, what a warning means). Thresholds in percentage points
# unless said otherwise; "value" in the JSON is in the same unit.
CHECKS = {
    "pgd_vs_autoattack": (
        10.0, "pp", "Croce & Hein 2020 (arXiv 2003.01690)",
        "AutoAttack is more than {t} pp below the best PGD: the PGD number is not a robustness "
        "estimate (AutoAttack's DLR loss is scale invariant; PGD's cross-entropy saturates)"),
    "eps_sweep": (
        1.0, "%", "Carlini et al. 2019 (arXiv 1902.06705); Athalye et al. 2018, §3.1",
        "accuracy does not fall to <= {t}% at the largest eps, or rises with eps by more than "
        "one image: a bounded attack that cannot win at large eps is a broken attack"),
    "unbounded": (
        0.0, "%", "Carlini et al. 2019 (\"unbounded attacks must reach 100% success\")",
        "an attack allowed to change the whole image leaves {value}% correct (> {t}%)"),
    "convergence": (
        5.0, "pp", "Carlini et al. 2019 (more iterations, random restarts)",
        "PGD-{strong} x {restarts} restarts is more than {t} pp below PGD-{pgd}: the quick "
        "attack had not converged"),
    "transfer": (
        1.0, "pp", "Athalye et al. 2018, §3.1 (black-box better than white-box); "
        "Carlini et al. 2019",
        "a transfer attack from the surrogate beats the white-box attack by more than {t} pp: "
        "the white-box gradients are masked"),
    "zero_gradients": (
        0.0, "% of points", "Croce & Hein 2020, check_zero_gradients; Athalye et al. 2018, §3",
        "{value}% of the correctly classified points have an all-zero or non-finite input "
        "gradient of the cross-entropy (shattered or vanishing gradients)"),
    "batchnorm_modes": (
        5.0, "pp", "Croce et al. 2021 (RobustBench, arXiv 2010.09670): evaluate in eval "
        "mode",
        "clean accuracy with batch statistics (train mode) differs from eval mode by more than "
        "{t} pp: the running statistics do not describe the data, or the result depends on "
        "how the test set is batched"),
    "determinism": (
        1e-4, "L2 of normalised logits", "Croce & Hein 2020, check_randomized (alpha 1e-4)",
        "repeated forward passes, or the same image in another batch, give outputs that differ "
        "by more than {t}: randomised or batch-dependent defence (use EOT / version 'rand')"),
    "autoattack_flags": (
        0, "flags", "Croce & Hein 2020 (arXiv 2003.01690) and AutoAttack's flags documentation",
        "AutoAttack's own checks raised: {value}"),
}


def _check(name: str, value, warn: bool, explanation: str | None = None, **fmt) -> dict:
    threshold, unit, source, text = CHECKS[name]
    return {"name": name, "status": "warn" if warn else "pass", "value": value,
            "threshold": threshold, "unit": unit, "source": source,
            "explanation": explanation or (text.format(t=threshold, value=value, **fmt)
                                           if warn else f"ok: {_ok_text(name, threshold)}")}


def _ok_text(name: str, t) -> str:
    return {"pgd_vs_autoattack": f"AutoAttack within {t} pp of PGD",
            "eps_sweep": f"accuracy falls monotonically to <= {t}%",
            "unbounded": "the unbounded attack breaks every point",
            "convergence": f"more steps and restarts gain <= {t} pp",
            "transfer": "transfer is weaker than white-box",
            "zero_gradients": "every point has a usable gradient",
            "batchnorm_modes": f"train and eval mode within {t} pp",
            "determinism": "outputs are deterministic and batch independent",
            "autoattack_flags": "none raised"}[name]


def parse_sweep(text: str) -> list[tuple[str, float]]:
    """'0,2/255,8/255' -> [(text, value)], which must be strictly ascending."""
    values = [parse_eps(v) for v in text.split(",") if v.strip()]
    if not values:
        raise EvalError(f"--sweep {text!r} lists no eps")
    for (a, va), (b, vb) in zip(values, values[1:]):
        if vb <= va:
            raise EvalError(f"--sweep must be strictly ascending: {b} follows {a}")
    return values


def _acc(flags: Tensor) -> float:
    return round(100 * flags.double().mean().item(), 2)


def _pgd_correct(model, x, y, *, eps, steps, norm, batch_size, seed, restarts=1) -> Tensor:
    """Correct under PGD-steps (cross-entropy) with `restarts` random starts (a point counts as
    broken if any restart breaks it); step 2.5 eps / steps (Madry et al. 2018)."""
    ok = torch.ones(len(y), dtype=torch.bool)
    for r in range(restarts):
        ok &= correct(model, x, y, eps=eps, steps=steps, step_size=2.5 * eps / steps,
                      norm=NORMS[norm], loss="ce", batch_size=batch_size, seed=seed + r)
    return ok


def unbounded_eps(norm: str, x: Tensor) -> float:
    """A radius that contains the whole image box: any image is reachable."""
    d = x[0].numel()
    return {"Linf": 1.0, "L2": math.sqrt(d), "L1": float(d)}[norm]


def _transfer_correct(model, surrogate, x, y, *, eps, steps, norm, batch_size, seed) -> Tensor:
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    with frozen(surrogate), frozen(model):
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            adv = pgd(lambda z, yb=yb: F.cross_entropy(surrogate(z), yb, reduction="none"), xb,
                      eps=eps, step_size=2.5 * eps / steps, steps=steps, norm=NORMS[norm],
                      generator=g)
            with torch.no_grad():
                out.append((model(adv).argmax(1) == yb).cpu())
    return torch.cat(out)


def _zero_gradient_share(model, x, y, batch_size) -> tuple[float, int, int]:
    device = next(model.parameters()).device
    zero = bad = 0
    with frozen(model):
        for i in range(0, len(y), batch_size):
            xb = x[i:i + batch_size].to(device).requires_grad_(True)
            loss = F.cross_entropy(model(xb), y[i:i + batch_size].to(device), reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)
            g = g.flatten(1)
            finite = torch.isfinite(g).all(1)
            bad += int((~finite).sum())
            zero += int(((g.abs().sum(1) == 0) & finite).sum())
    n = len(y)
    return (round(100 * (zero + bad) / n, 2) if n else 0.0), zero, bad


def _logits(model, x, batch_size) -> Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(x), batch_size)])


def _batchnorm_gap(model, x, y, batch_size) -> tuple[float, float, float]:
    """(train-mode clean accuracy, eval-mode clean accuracy, |gap|) in percent; train mode on a
    copy, so the model's running statistics are untouched."""
    train = copy.deepcopy(model).train()
    acc_train = _acc(_logits(train, x, batch_size).argmax(1) == y)
    acc_eval = _acc(_logits(model, x, batch_size).argmax(1) == y)
    return acc_train, acc_eval, round(abs(acc_train - acc_eval), 2)


def _determinism(model, x, batch_size) -> float:
    """Largest L2 distance between L2-normalised logits over 3 identical passes and over the
    same images evaluated one by one."""
    def normed(z):
        return z / (z.norm(dim=1, keepdim=True) + 1e-10)
    first = normed(_logits(model, x, batch_size))
    runs = [normed(_logits(model, x, batch_size)) for _ in range(2)]
    few = x[:min(8, len(x))]
    alone = normed(_logits(model, few, 1))
    diffs = [(first - r).norm(dim=1).max().item() for r in runs]
    diffs.append((first[:len(few)] - alone).norm(dim=1).max().item())
    return max(diffs)


def _screening_autoattack(model, x, y, clean, *, eps, norm, budget, batch_size, seed) -> dict:
    """APGD-CE then APGD-T (official code) with a reduced budget, and AutoAttack's flags."""
    from pyautoattack import AutoAttack

    device = next(model.parameters()).device
    adversary = AutoAttack(model, norm=norm, eps=eps, version="custom", seed=seed,
                           attacks=["apgd-ce", "apgd-t"], device=device)
    adversary.apgd.n_restarts = adversary.apgd_targeted.n_restarts = 1  # as the standard version
    adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = budget.aa_iters
    adversary.apgd_targeted.n_target_classes = budget.aa_targets
    ok, stages = clean.clone(), []
    for stage in ("apgd-ce", "apgd-t"):
        idx = ok.nonzero().flatten()
        if len(idx):
            adversary.attacks_to_run = [stage]
            _, y_adv = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
            ok[idx] = y_adv.cpu() == y[idx]
        stages.append({"attack": stage, "robust_acc": _acc(ok)})
    flags = aa_flags.compute_flags(model, x, y, clean, stages, eps=eps, norm=norm,
                                   version="standard", batch_size=batch_size, device=device,
                                   seed=seed)
    return {"robust_acc": _acc(ok), "version": "screening", "attacks": ["apgd-ce", "apgd-t"],
            "iterations": budget.aa_iters, "target_classes": budget.aa_targets, "path": None,
            "stages": stages, "flags": flags, "flags_raised": aa_flags.raised(flags)}


def audit(t: Target, *, n_ex: int | None = 1000, eps: str | None = None, norm: str = "Linf",
          surrogate: Target | None = None, sweep: list[tuple[str, float]] | None = None,
          budget: Budget = FULL, batch_size: int = 500, seed: int = 0) -> dict:
    """Run every check on the first `n_ex` test images; returns the report that is also
    written to <out_dir>/audit_<norm>_eps<eps>_n<images>_<weights>.json (`audit_name`)."""
    if norm not in NORMS:
        raise EvalError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    eps_text, eps_value = parse_eps(eps if eps is not None else DEFAULT_EPS[norm])
    if eps_value == 0:
        raise EvalError("--eps 0: an audit needs a radius > 0 (at 0 every attack measures the "
                        "clean accuracy and every check passes)")
    check_writable(t.out_dir)  # before any computation
    x, y = load_test_data(t, n_ex)
    check_eps(eps_value, norm, x)
    for text, value in sweep or []:  # a radius the eps check refuses is no point of a curve
        problem = value and eps_problem("--sweep", value, norm, x[0].numel())
        if problem:
            raise EvalError(problem)
    model = t.model
    device = next(model.parameters()).device
    n_classes = _logits(model, x[:2], 2).shape[1]
    if surrogate is not None:
        s_classes = _logits(surrogate.model, x[:2].to(
            next(surrogate.model.parameters()).device), 2).shape[1]
        if s_classes != n_classes:
            raise EvalError(f"the surrogate has {s_classes} classes, the model {n_classes}: "
                            f"a transfer attack needs the same label space")
    if sweep is None:
        sweep = [(f"{f:g}x{eps_text}", f * eps_value) for f in SWEEP_FACTORS]
    started = time.time()
    common = dict(norm=norm, batch_size=batch_size, seed=seed)
    clean = _logits(model, x, batch_size).argmax(1) == y
    checks, skipped, timings = [], [], {}

    def timed(name, fn):
        began = time.time()
        out = fn()
        timings[name] = round(time.time() - began, 2)
        return out

    pgd_ok = timed("pgd", lambda: _pgd_correct(model, x, y, eps=eps_value,
                                               steps=budget.pgd_steps, **common))
    strong_ok = timed("convergence", lambda: _pgd_correct(
        model, x, y, eps=eps_value, steps=budget.strong_steps, restarts=budget.restarts,
        **common))
    pgd_acc, strong_acc = _acc(pgd_ok), _acc(strong_ok & pgd_ok)
    gain = round(pgd_acc - strong_acc, 2)
    checks.append(_check("convergence", gain, gain > CHECKS["convergence"][0],
                         strong=budget.strong_steps, restarts=budget.restarts,
                         pgd=budget.pgd_steps))

    if budget.aa_iters is None:
        aa = timed("autoattack", lambda: aa_eval.evaluate(
            t, n_ex=len(y), version="standard", norm=norm, eps=eps_text, batch_size=batch_size,
            seed=seed, progress=False))
    else:
        aa = timed("autoattack", lambda: _screening_autoattack(
            model, x, y, clean, eps=eps_value, budget=budget, **common))
    gap = round(min(pgd_acc, strong_acc) - aa["robust_acc"], 2)
    checks.append(_check("pgd_vs_autoattack", gap, gap > CHECKS["pgd_vs_autoattack"][0]))

    sweep_acc = timed("eps_sweep", lambda: [
        _acc(clean) if value == 0 else
        _acc(_pgd_correct(model, x, y, eps=value, steps=budget.pgd_steps, **common))
        for _, value in sweep])
    rise = max([b - a for a, b in zip(sweep_acc, sweep_acc[1:])] + [0.0])
    one_image = 100 / len(y)
    warn = sweep_acc[-1] > CHECKS["eps_sweep"][0] or rise > one_image + 1e-9
    checks.append(_check("eps_sweep", sweep_acc[-1], warn))

    big = unbounded_eps(norm, x)
    unbounded = timed("unbounded", lambda: _acc(_pgd_correct(
        model, x, y, eps=big, steps=budget.unbounded_steps, **common)))
    checks.append(_check("unbounded", unbounded, unbounded > CHECKS["unbounded"][0]))

    if surrogate is not None:
        transfer = timed("transfer", lambda: _acc(_transfer_correct(
            model, surrogate.model, x, y, eps=eps_value, steps=budget.transfer_steps,
            **common)))
        white = min(pgd_acc, strong_acc)
        lead = round(white - transfer, 2)
        checks.append(_check("transfer", lead, lead > CHECKS["transfer"][0]))
    else:
        skipped.append({"name": "transfer", "why": "no --surrogate given (use a standard-"
                        "trained model of the same dataset)"})

    share, zero, bad = timed("zero_gradients", lambda: _zero_gradient_share(
        model, x[clean], y[clean], batch_size))
    checks.append(_check("zero_gradients", share, share > CHECKS["zero_gradients"][0]))

    acc_train, acc_eval, bn_gap = timed("batchnorm_modes", lambda: _batchnorm_gap(
        model, x, y, batch_size))
    checks.append(_check("batchnorm_modes", bn_gap, bn_gap > CHECKS["batchnorm_modes"][0]))

    det = timed("determinism", lambda: _determinism(model, x, batch_size))
    checks.append(_check("determinism", float(f"{det:.3g}"), det > CHECKS["determinism"][0]))

    raised = aa["flags_raised"]
    checks.append(_check("autoattack_flags", ", ".join(raised) or "none", bool(raised)))

    verdict = "warn" if any(c["status"] == "warn" for c in checks) else "pass"
    report = {
        "verdict": verdict, "checks": checks, "skipped": skipped,
        "n_ex": len(y), "eps": eps_text, "eps_float": eps_value, "norm": norm,
        "clean_acc": _acc(clean), "pgd": {"steps": budget.pgd_steps, "robust_acc": pgd_acc},
        "strong_pgd": {"steps": budget.strong_steps, "restarts": budget.restarts,
                       "robust_acc": strong_acc},
        "autoattack": {"robust_acc": aa["robust_acc"], "version": aa["version"],
                       "attacks": aa["attacks"], "path": aa["path"], "flags_raised": raised},
        "sweep": {"eps": [v for _, v in sweep], "eps_text": [s for s, _ in sweep],
                  "robust_acc": sweep_acc, "attack": f"pgd{budget.pgd_steps}"},
        "unbounded": {"eps": big, "robust_acc": unbounded},
        "gradients": {"zero": zero, "nonfinite": bad, "points": int(clean.sum())},
        "batchnorm": {"train_mode_acc": acc_train, "eval_mode_acc": acc_eval},
        "surrogate": None if surrogate is None else {
            "checkpoint": str(surrogate.checkpoint), "arch": surrogate.arch,
            "checkpoint_sha256": surrogate.checkpoint_sha256},
        "budget": {k: v for k, v in budget.__dict__.items()},
        "quick": budget != FULL, "seed": seed, "batch_size": batch_size,
        "timings": timings, "seconds": round(time.time() - started, 1),
        **provenance(t, device),
    }
    # Keyed by its settings: a quick or smaller audit never replaces a full one.
    path = t.out_dir / f"{audit_name(norm, eps_value, len(y), t.weights, budget != FULL)}.json"
    write_json(report, path)
    report["path"] = str(path)
    try:
        from .plot import robustness_png
        report["plot"] = str(robustness_png(t.out_dir, t.weights))
    except ImportError:  # matplotlib missing: the JSON is the result, the figure a convenience
        pass
    return report


def table(report: dict) -> str:
    rows = [("check", "status", "value", "threshold")]
    for c in report["checks"]:
        rows.append((c["name"], c["status"].upper(), str(c["value"]),
                     f"{c['threshold']} {c['unit']}"))
    for s in report["skipped"]:
        rows.append((s["name"], "skipped", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (f"audit of {report['arch']} {report['dataset']} ({report['weights']}), "
            f"{report['norm']} eps {report['eps']}, {report['n_ex']} images"
            f"{' (quick budgets)' if report['quick'] else ''}: clean {report['clean_acc']}%  "
            f"PGD-{report['pgd']['steps']} {report['pgd']['robust_acc']}%  AutoAttack "
            f"{report['autoattack']['robust_acc']}%")
    foot = f"verdict: {report['verdict'].upper()}"
    warns = [f"  {c['name']}: {c['explanation']}" for c in report["checks"]
             if c["status"] == "warn"]
    return "\n".join([head, *lines, foot, *warns])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(p)
    p.set_defaults(n_ex=1000)
    p.add_argument("--surrogate", help="run directory or checkpoint of a model (ideally "
                   "standard-trained, same dataset) for the transfer check")
    p.add_argument("--surrogate-weights", default="best")
    p.add_argument("--surrogate-arch", help="arch of a bare surrogate checkpoint")
    p.add_argument("--sweep", help="comma-separated ascending eps list for the eps sweep "
                   "(default: 0, 1/4, 1/2, 1, 2, 4 and 8 x eps)")
    p.add_argument("--quick", action="store_true", help="small attack budgets (smoke tests; "
                   "not for a paper)")
    p.add_argument("--strict", action="store_true", help="exit 3 when the verdict is warn")
    add_tf32_argument(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        sweep = parse_sweep(args.sweep) if args.sweep else None
        t = target_from_arguments(args)
        surrogate = None
        if args.surrogate:
            try:
                surrogate = load_target(args.surrogate, args.surrogate_weights,
                                        args.surrogate_arch,
                                        t.dataset if args.surrogate_arch else None,
                                        next(t.model.parameters()).device, args.data_root)
            except EvalError as err:  # named by the surrogate's own flags
                why = str(err).replace("--arch and --dataset", "--surrogate-arch (its dataset "
                                       "is the model's)").replace("--weights",
                                                                   "--surrogate-weights")
                raise EvalError(f"--surrogate {args.surrogate}: {why}") from None
            if surrogate.checkpoint_sha256 == t.checkpoint_sha256:
                raise EvalError(f"--surrogate {args.surrogate} holds the audited weights "
                                f"themselves; a transfer check needs another model (ideally "
                                f"a standard-trained one)")
            if surrogate.dataset != t.dataset:
                raise EvalError(f"the surrogate was trained on {surrogate.dataset}, the model "
                                f"on {t.dataset}")
        with evaluation_precision(args.allow_tf32):
            report = audit(t, n_ex=args.n_ex, eps=args.eps, norm=args.norm,
                           surrogate=surrogate, sweep=sweep, budget=QUICK if args.quick else FULL,
                           batch_size=resolve_batch_size(args.batch_size, t), seed=args.seed)
    except USER_ERRORS as err:
        return report_error("eval.audit", err)
    print(table(report))
    print(f"-> {report['path']}")
    return 3 if args.strict and report["verdict"] == "warn" else 0


if __name__ == "__main__":
    sys.exit(main())
