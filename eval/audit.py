"""A gradient-masking audit: the sanity checks of Carlini et al. 2019 ("On evaluating adversarial
robustness", arXiv 1902.06705, and its checklist), Athalye, Carlini & Wagner
2018 (ICML, arXiv 1802.00420, §3.1 "identifying obfuscated and masked gradients") and
AutoAttack's flags (Croce & Hein 2020, arXiv 2003.01690), run on one checkpoint.

    python -m eval.audit runs/cifar10_ikl_at --n-ex 1000 --surrogate runs/cifar10_standard

Writes <out_dir>/audit_<norm>_eps<eps>_n<images>_<weights>.json (audit-quick_... with --quick;
each setting its own file): {"verdict": "pass" | "inconclusive" | "warn", "checks": [{"name",
"status", "value", "threshold", "explanation"}], ...} and robustness_<weights>.png, prints a
table, exits 0 on any verdict (3 on "warn" with --strict). Each check, its threshold and its
source are listed in `CHECKS` and explained in docs/reporting.md. --quick shrinks every attack
budget (for tests and smoke runs; not for a paper).
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from at.target import DatasetMismatch, Target
from attacks import frozen, pgd
from attacks.accuracy import correct
from attacks.pgd import eps_problem

from . import aa_flags, confidence
from . import autoattack as aa_eval
from .common import (
    DEFAULT_EPS,
    EvalError,
    any_target,
    attack_norm,
    autoattack_norm,
    check_eps,
    check_radius,
    check_writable,
    eps_argument,
    known_norm,
    load_test_data,
    parse_eps,
    provenance,
    resolve_batch_size,
    run_command,
    target_from_arguments,
    write_result,
)
from .results import audit_name

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
                      norm=norm, loss="ce", batch_size=batch_size, seed=seed + r)
    return ok


def unbounded_eps(norm: str, x: Tensor) -> float:
    """A radius that contains the whole image box: any image is reachable."""
    d = x[0].numel()
    return {"linf": 1.0, "l2": math.sqrt(d), "l1": float(d)}[norm]


def _transfer_correct(model, surrogate, x, y, *, eps, steps, norm, batch_size, seed) -> Tensor:
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    with frozen(surrogate), frozen(model):
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            adv = pgd(lambda z, yb=yb: F.cross_entropy(surrogate(z), yb, reduction="none"), xb,
                      eps=eps, step_size=2.5 * eps / steps, steps=steps, norm=norm,
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
    adversary = AutoAttack(model, norm=autoattack_norm(norm), eps=eps, version="custom", seed=seed,
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


class _Audit:
    """What the checks share: the model and images, the attack settings, and what each check
    measured that the report shows (`found`) and how long it took (`timings`)."""

    def __init__(self, t: Target, x: Tensor, y: Tensor, *, eps_text: str, eps_value: float,
                 norm: str, surrogate: Target | None, sweep: list[tuple[str, float]],
                 budget: Budget, batch_size: int, seed: int):
        self.t, self.model, self.x, self.y = t, t.model, x, y
        self.eps_text, self.eps_value, self.surrogate, self.sweep = eps_text, eps_value, \
            surrogate, sweep
        self.budget, self.batch_size, self.seed = budget, batch_size, seed
        self.common = dict(norm=norm, batch_size=batch_size, seed=seed)  # attacks/' norm
        self.clean = _logits(self.model, x, batch_size).argmax(1) == y
        self.found: dict = {}
        self.timings: dict[str, float] = {}

    def timed(self, name: str, fn: Callable):
        began = time.time()
        out = fn()
        self.timings[name] = round(time.time() - began, 2)
        return out

    def pgd(self, eps: float, steps: int, restarts: int = 1) -> Tensor:
        return _pgd_correct(self.model, self.x, self.y, eps=eps, steps=steps, restarts=restarts,
                            **self.common)

    def white_box(self) -> float:
        """The best white-box accuracy: the lower of PGD's and the strong PGD's."""
        return min(self.found["pgd_acc"], self.found["strong_acc"])


# Each check: measure(audit, threshold) -> (value, warn, fields for the warning text), or None
# when it cannot run (its reason in the report's "skipped"). They run in the table's order and
# may use what an earlier one found.
def _convergence(a: _Audit, t: float) -> tuple:
    b = a.budget
    pgd_ok = a.timed("pgd", lambda: a.pgd(a.eps_value, b.pgd_steps))
    strong_ok = a.timed("convergence", lambda: a.pgd(a.eps_value, b.strong_steps, b.restarts))
    a.found.update(pgd_acc=_acc(pgd_ok), strong_acc=_acc(strong_ok & pgd_ok))
    gain = round(a.found["pgd_acc"] - a.found["strong_acc"], 2)
    return gain, gain > t, dict(strong=b.strong_steps, restarts=b.restarts, pgd=b.pgd_steps)


def _pgd_vs_autoattack(a: _Audit, t: float) -> tuple:
    if a.budget.aa_iters is None:
        aa = a.timed("autoattack", lambda: aa_eval.evaluate(
            a.t, n_ex=len(a.y), version="standard", norm=autoattack_norm(a.common["norm"]),
            eps=a.eps_text, batch_size=a.batch_size, seed=a.seed, progress=False))
    else:
        aa = a.timed("autoattack", lambda: _screening_autoattack(
            a.model, a.x, a.y, a.clean, eps=a.eps_value, budget=a.budget, **a.common))
    a.found["aa"] = aa
    gap = round(a.white_box() - aa["robust_acc"], 2)
    return gap, gap > t, {}


def _eps_sweep(a: _Audit, t: float) -> tuple:
    accs = a.timed("eps_sweep", lambda: [
        _acc(a.clean) if value == 0 else _acc(a.pgd(value, a.budget.pgd_steps))
        for _, value in a.sweep])
    a.found["sweep_acc"] = accs
    rise = max([later - before for before, later in zip(accs, accs[1:])] + [0.0])
    one_image = 100 / len(a.y)
    return accs[-1], accs[-1] > t or rise > one_image + 1e-9, {}


def _unbounded(a: _Audit, t: float) -> tuple:
    big = unbounded_eps(a.common["norm"], a.x)
    acc = a.timed("unbounded", lambda: _acc(a.pgd(big, a.budget.unbounded_steps)))
    a.found["unbounded"] = {"eps": big, "robust_acc": acc}
    return acc, acc > t, {}


def _transfer(a: _Audit, t: float) -> tuple | None:
    if a.surrogate is None:
        return None
    transfer = a.timed("transfer", lambda: _acc(_transfer_correct(
        a.model, a.surrogate.model, a.x, a.y, eps=a.eps_value, steps=a.budget.transfer_steps,
        **a.common)))
    lead = round(a.white_box() - transfer, 2)
    return lead, lead > t, {}


def _zero_gradients(a: _Audit, t: float) -> tuple:
    share, zero, bad = a.timed("zero_gradients", lambda: _zero_gradient_share(
        a.model, a.x[a.clean], a.y[a.clean], a.batch_size))
    a.found["gradients"] = {"zero": zero, "nonfinite": bad, "points": int(a.clean.sum())}
    return share, share > t, {}


def _batchnorm_modes(a: _Audit, t: float) -> tuple:
    acc_train, acc_eval, gap = a.timed("batchnorm_modes", lambda: _batchnorm_gap(
        a.model, a.x, a.y, a.batch_size))
    a.found["batchnorm"] = {"train_mode_acc": acc_train, "eval_mode_acc": acc_eval}
    return gap, gap > t, {}


def _determinism_check(a: _Audit, t: float) -> tuple:
    det = a.timed("determinism", lambda: _determinism(a.model, a.x, a.batch_size))
    return float(f"{det:.3g}"), det > t, {}


def _autoattack_flags(a: _Audit, t: float) -> tuple:
    raised = a.found["aa"]["flags_raised"]
    return ", ".join(raised) or "none", bool(raised), {}


@dataclass(frozen=True)
class Check:
    """A check of the audit: its threshold (in `unit`; "value" in the JSON is in the same
    unit), its source, what a warning means (`warning`: {t} the threshold, {value} the measured
    value), what passing means (`ok`) and how it is measured."""
    threshold: float
    unit: str
    source: str
    warning: str
    ok: str
    measure: Callable[[_Audit, float], tuple | None]


# In the order they run and are reported.
CHECKS = {
    "convergence": Check(
        5.0, "pp", "Carlini et al. 2019 (more iterations, random restarts)",
        "PGD-{strong} x {restarts} restarts is more than {t} pp below PGD-{pgd}: the quick "
        "attack had not converged",
        "more steps and restarts gain <= {t} pp", _convergence),
    "pgd_vs_autoattack": Check(
        10.0, "pp", "Croce & Hein 2020 (arXiv 2003.01690)",
        "AutoAttack is more than {t} pp below the best PGD: the PGD number is not a robustness "
        "estimate (AutoAttack's DLR loss is scale invariant; PGD's cross-entropy saturates)",
        "AutoAttack within {t} pp of PGD", _pgd_vs_autoattack),
    "eps_sweep": Check(
        1.0, "%", "Carlini et al. 2019 (arXiv 1902.06705); Athalye et al. 2018, §3.1",
        "accuracy does not fall to <= {t}% at the largest eps, or rises with eps by more than "
        "one image: a bounded attack that cannot win at large eps is a broken attack",
        "accuracy falls monotonically to <= {t}%", _eps_sweep),
    "unbounded": Check(
        0.0, "%", "Carlini et al. 2019 (\"unbounded attacks must reach 100% success\")",
        "an attack allowed to change the whole image leaves {value}% correct (> {t}%)",
        "the unbounded attack breaks every point", _unbounded),
    "transfer": Check(
        1.0, "pp", "Athalye et al. 2018, §3.1 (black-box better than white-box); "
        "Carlini et al. 2019",
        "a transfer attack from the surrogate beats the white-box attack by more than {t} pp: "
        "the white-box gradients are masked",
        "transfer is weaker than white-box", _transfer),
    "zero_gradients": Check(
        0.0, "% of points", "Croce & Hein 2020, check_zero_gradients; Athalye et al. 2018, §3",
        "{value}% of the correctly classified points have an all-zero or non-finite input "
        "gradient of the cross-entropy (shattered or vanishing gradients)",
        "every point has a usable gradient", _zero_gradients),
    "batchnorm_modes": Check(
        5.0, "pp", "Croce et al. 2021 (RobustBench, arXiv 2010.09670): evaluate in eval "
        "mode",
        "clean accuracy with batch statistics (train mode) differs from eval mode by more than "
        "{t} pp: the running statistics do not describe the data, or the result depends on "
        "how the test set is batched",
        "train and eval mode within {t} pp", _batchnorm_modes),
    "determinism": Check(
        1e-4, "L2 of normalised logits", "Croce & Hein 2020, check_randomized (alpha 1e-4)",
        "repeated forward passes, or the same image in another batch, give outputs that differ "
        "by more than {t}: randomised or batch-dependent defence (use EOT / version 'rand')",
        "outputs are deterministic and batch independent", _determinism_check),
    "autoattack_flags": Check(
        0, "flags", "Croce & Hein 2020 (arXiv 2003.01690) and AutoAttack's flags documentation",
        "AutoAttack's own checks raised: {value}",
        "none raised", _autoattack_flags),
}
# Why a check did not run (its measure returned None).
SKIPPED = {"transfer": "no --surrogate given (use a standard-trained model of the same dataset)"}


def _check_nonzero(eps: float) -> None:
    if eps == 0:
        raise EvalError("--eps 0: an audit needs a radius > 0 (at 0 every attack measures the "
                        "clean accuracy and every check passes)")


def _outcome(name: str, value, warn: bool, fields: dict) -> dict:
    c = CHECKS[name]
    return {"name": name, "status": "warn" if warn else "pass", "value": value,
            "threshold": c.threshold, "unit": c.unit, "source": c.source,
            "explanation": c.warning.format(t=c.threshold, value=value, **fields) if warn
            else f"ok: {c.ok.format(t=c.threshold)}"}


def audit(t: Target, *, n_ex: int | None = 1000, eps: str | None = None, norm: str = "Linf",
          surrogate: Target | None = None, sweep: list[tuple[str, float]] | None = None,
          budget: Budget = FULL, batch_size: int = 500, seed: int = 0) -> dict:
    """Run every check on the first `n_ex` test images; returns the report that is also
    written to <out_dir>/audit_<norm>_eps<eps>_n<images>_<weights>.json (`audit_name`)."""
    threat = attack_norm(norm)
    eps_text, eps_value = parse_eps(eps if eps is not None else DEFAULT_EPS[threat])
    _check_nonzero(eps_value)
    check_writable(t.out_dir)  # before any computation
    x, y = load_test_data(t, n_ex)
    check_eps(eps_value, threat, x)
    for text, value in sweep or []:  # a radius the eps check refuses is no point of a curve
        problem = value and eps_problem("--sweep", value, threat, x[0].numel())
        if problem:
            raise EvalError(problem)
    device = next(t.model.parameters()).device
    n_classes = _logits(t.model, x[:2], 2).shape[1]
    if surrogate is not None:
        s_classes = _logits(surrogate.model, x[:2].to(
            next(surrogate.model.parameters()).device), 2).shape[1]
        if s_classes != n_classes:
            raise EvalError(f"the surrogate has {s_classes} classes, the model {n_classes}: "
                            f"a transfer attack needs the same label space")
    if sweep is None:
        sweep = [(f"{f:g}x{eps_text}", f * eps_value) for f in SWEEP_FACTORS]
    started = time.time()
    a = _Audit(t, x, y, eps_text=eps_text, eps_value=eps_value, norm=threat,
               surrogate=surrogate, sweep=sweep, budget=budget, batch_size=batch_size, seed=seed)
    checks, skipped = [], []
    for name, check in CHECKS.items():
        outcome = check.measure(a, check.threshold)
        if outcome is None:
            skipped.append({"name": name, "why": SKIPPED[name]})
        else:
            checks.append(_outcome(name, *outcome))
    found, aa = a.found, a.found["aa"]
    # Each share's 95 % interval against its threshold (docs/zoo.md#confidence-intervals).
    verdict = confidence.qualify_checks(checks, len(y), int(a.clean.sum()))
    report = {
        "verdict": verdict, "checks": checks, "skipped": skipped,
        "n_ex": len(y), "eps": eps_text, "eps_float": eps_value, "norm": norm,
        "clean_acc": _acc(a.clean),
        "clean_ci95": confidence.interval(int(a.clean.sum()), len(y)),
        "pgd": {"steps": budget.pgd_steps, "robust_acc": found["pgd_acc"]},
        "strong_pgd": {"steps": budget.strong_steps, "restarts": budget.restarts,
                       "robust_acc": found["strong_acc"]},
        "autoattack": {"robust_acc": aa["robust_acc"], "version": aa["version"],
                       "attacks": aa["attacks"], "path": aa["path"],
                       "flags_raised": aa["flags_raised"]},
        "sweep": {"eps": [v for _, v in sweep], "eps_text": [s for s, _ in sweep],
                  "robust_acc": found["sweep_acc"], "attack": f"pgd{budget.pgd_steps}"},
        "unbounded": found["unbounded"], "gradients": found["gradients"],
        "batchnorm": found["batchnorm"],
        "surrogate": None if surrogate is None else {
            "checkpoint": str(surrogate.checkpoint), "arch": surrogate.arch,
            "checkpoint_sha256": surrogate.checkpoint_sha256},
        "budget": {k: v for k, v in budget.__dict__.items()},
        "quick": budget != FULL, "seed": seed, "batch_size": batch_size,
        "timings": a.timings, "seconds": round(time.time() - started, 1),
        **provenance(t, device),
    }
    # Keyed by its settings: a quick or smaller audit never replaces a full one.
    path = t.out_dir / f"{audit_name(threat, eps_value, len(y), t.weights, budget != FULL)}.json"
    write_result(report, path)
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """eval.audit's own arguments (besides the target's: eval.common.command_parser)."""
    p.set_defaults(n_ex=1000)
    p.add_argument("--surrogate", help="run directory, checkpoint or rb: entry of a model "
                   "(ideally standard-trained, same dataset) for the transfer check")
    p.add_argument("--surrogate-weights", default="best")
    p.add_argument("--surrogate-arch", help="arch of a bare surrogate checkpoint")
    p.add_argument("--sweep", help="comma-separated ascending eps list for the eps sweep "
                   "(default: 0, 1/4, 1/2, 1, 2, 4 and 8 x eps)")
    p.add_argument("--quick", action="store_true", help="small attack budgets (smoke "
                   "tests; not for a paper)")
    p.add_argument("--strict", action="store_true", help="exit 3 when the verdict is warn")


def check_arguments(args: argparse.Namespace) -> None:
    """The command line alone, before the target is loaded (eval.arguments: a sweep's too)."""
    eps = eps_argument(args)
    if eps is not None:
        _check_nonzero(eps)
    for _, value in parse_sweep(args.sweep) if args.sweep else []:
        if value:
            check_radius("--sweep", value, known_norm(args))


def main(argv: list[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> int:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        sweep = parse_sweep(args.sweep) if args.sweep else None
        t = target_from_arguments(args)
        surrogate = None
        if args.surrogate:
            try:
                surrogate = any_target(args.surrogate, weights=args.surrogate_weights,
                                       arch=args.surrogate_arch,
                                       dataset=t.dataset if args.surrogate_arch else None,
                                       device=next(t.model.parameters()).device,
                                       data_root=args.data_root, model_dir=args.model_dir)
            except DatasetMismatch as err:
                raise EvalError(f"--surrogate {args.surrogate} has {err.found} {err.what}, the "
                                f"audited model ({t.arch}, {t.dataset}) {err.expected}: a bare "
                                f"surrogate checkpoint is taken to be of the audited model's "
                                f"dataset, and this one is of another") from None
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
        report = audit(t, n_ex=args.n_ex, eps=args.eps, norm=args.norm, surrogate=surrogate,
                       sweep=sweep, budget=QUICK if args.quick else FULL,
                       batch_size=resolve_batch_size(args.batch_size, t), seed=args.seed)
        print(table(report))
        print(f"-> {report['path']}")
        return 3 if args.strict and report["verdict"] == "warn" else 0

    return run_command("eval.audit", __doc__, argv, add_arguments, run, check=check_arguments)


if __name__ == "__main__":
    sys.exit(main())
