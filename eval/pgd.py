"""Quick white-box checks: PGD-k on the cross-entropy (Madry et al. 2018) or on the CW margin
(CW-inf, Carlini & Wagner 2017), from a uniform random start, in eval mode and float32.

    python -m eval.pgd runs/cifar100_ikl_at --attack cw --steps 20

Writes <run>/eval/<attack><steps>_<norm>_eps<eps>_n<images>_<weights>.json (e.g.
pgd20_linf_eps8-255_n10000_best.json: another eps or number of images is another file). Use
AutoAttack (eval.autoattack) for reported numbers; these are for screening checkpoints and for
sanity checks (AutoAttack <= PGD <= clean).
"""
from __future__ import annotations

import argparse
import sys
import time

from at.target import Target
from attacks.accuracy import correct

from . import confidence
from .common import (
    DEFAULT_EPS,
    EvalError,
    attack_norm,
    check_eps,
    check_writable,
    eps_argument,
    load_test_data,
    parse_eps,
    provenance,
    resolve_batch_size,
    result_name,
    run_command,
    target_from_arguments,
    write_result,
)

ATTACKS = {"pgd": "ce", "cw": "cw"}


def evaluate(t: Target, *, attack: str = "pgd", steps: int = 20, n_ex: int | None = None,
             eps: str | None = None, step_size: str | None = None, norm: str = "Linf",
             batch_size: int = 500, seed: int = 0) -> dict:
    """Clean and PGD accuracy of `t` on the first `n_ex` test images; the result is also written
    to <out_dir>/<attack><steps>_<norm>_eps<eps>_n<images>_<weights>.json (`result_name`)."""
    _check_settings(attack, steps)
    name = attack_norm(norm)
    if batch_size < 1:
        raise EvalError("--batch-size must be >= 1")
    eps_text, eps_value = parse_eps(eps if eps is not None else DEFAULT_EPS[name])
    # Default step: 2/255 for the usual L-inf 8/255 setting, otherwise eps / 4.
    step_text, step_value = parse_eps(step_size) if step_size else (
        ("2/255", 2 / 255) if (name, eps_text) == ("linf", "8/255") else
        (f"{eps_text}/4", eps_value / 4))
    check_writable(t.out_dir)  # before any computation
    x, y = load_test_data(t, n_ex)
    check_eps(eps_value, name, x)
    started = time.time()
    common = dict(batch_size=batch_size, seed=seed)
    clean = correct(t.model, x, y, **common)
    robust = correct(t.model, x, y, eps=eps_value, steps=steps, step_size=step_value,
                     norm=name, loss=ATTACKS[attack], **common)
    device = next(t.model.parameters()).device
    result = {
        "clean_acc": round(100 * clean.double().mean().item(), 2),
        "robust_acc": round(100 * robust.double().mean().item(), 2),
        "clean_ci95": confidence.interval(int(clean.sum()), len(y)),
        "robust_ci95": confidence.interval(int(robust.sum()), len(y)),
        "attack": attack, "loss": ATTACKS[attack], "steps": steps, "step_size": step_text,
        "step_size_float": step_value, "init": "uniform", "restarts": 1,
        "n_ex": len(y), "eps": eps_text, "eps_float": eps_value, "norm": norm, "seed": seed,
        "batch_size": batch_size, "seconds": round(time.time() - started, 1),
        **provenance(t, device),
    }
    path = t.out_dir / f"{result_name(f'{attack}{steps}', norm, eps_value, len(y), t.weights)}.json"
    write_result(result, path)
    result["path"] = str(path)
    return result


def _check_settings(attack: str, steps: int) -> None:
    if attack not in ATTACKS:
        raise EvalError(f"unknown attack {attack!r}; valid: {', '.join(ATTACKS)}")
    if steps < 1:
        raise EvalError("--steps must be >= 1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """eval.pgd's own arguments (besides the target's: eval.common.command_parser)."""
    p.add_argument("--attack", default="pgd", help="pgd (cross-entropy) | cw (CW margin)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-size", help="default 2/255 for Linf 8/255, else eps/4")


def check_arguments(args: argparse.Namespace) -> None:
    """The command line alone, before the target is loaded (eval.arguments: a sweep's too)."""
    _check_settings(args.attack, args.steps)
    eps_argument(args)
    if args.step_size is not None:
        parse_eps(args.step_size)


def main(argv: list[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> int:
        t = target_from_arguments(args)
        r = evaluate(t, attack=args.attack, steps=args.steps, n_ex=args.n_ex, eps=args.eps,
                     step_size=args.step_size, norm=args.norm,
                     batch_size=resolve_batch_size(args.batch_size, t), seed=args.seed)
        print(f"{t.arch} {t.dataset} ({t.weights}): clean {r['clean_acc']:.2f}%  "
              f"{args.attack.upper()}-{r['steps']} {r['norm']} {r['eps']}: "
              f"{r['robust_acc']:.2f}% on {r['n_ex']} images")
        return 0

    return run_command("eval.pgd", __doc__, argv, add_arguments, run, check=check_arguments)


if __name__ == "__main__":
    sys.exit(main())
