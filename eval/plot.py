"""Robustness curves: accuracy against eps from the results in a run's eval/ directory (PGD and
CW points from eval.pgd, AutoAttack points from eval.autoattack, the eps sweep of eval.audit).

    python -m eval.plot runs/cifar10_ikl_at        # -> runs/.../eval/robustness_best.png
    python -m eval.plot runs/a runs/b --labels IKL-AT,TRADES --out fig.png   # overlay for a paper

A RUN is a run directory, a checkpoint's eval directory or the directory holding it. Only the
results of --weights (default best) and --norm (default: the norm with the most results) are
drawn; eps is on the [0, 1] pixel scale, shown in units of 1/255 under Linf.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from attacks.pgd import NORMS
from errors import USER_ERRORS, report

from .common import EvalError, autoattack_norm
from .figures import figure_format, save
from .results import fullest
from .zoo_target import WEIGHTS, is_zoo, results_dir


def _results_dir(run: Path) -> Path:
    if not run.is_dir():
        raise EvalError(f"{run} is not a directory")
    return run / "eval" if (run / "eval").is_dir() else run


def collect(run: Path, weights: str) -> dict:
    """{'points': [(family, norm, eps, acc)], 'sweeps': [(norm, [eps], [acc])], 'notes': [...]}
    of one run. Of several results at one point (or several audits of one norm), the full-budget
    one is drawn (eval/results.py) and a note names it."""
    out = _results_dir(run)
    points, audits = {}, {}
    for path in sorted(out.glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EvalError(f"{path} is unreadable ({err})") from None
        if not isinstance(r, dict) or r.get("weights", weights) != weights:
            continue
        if path.name.startswith("audit") and "sweep" in r:
            audits.setdefault(r["norm"], []).append((path, r))
        elif "eps_float" in r and "robust_acc" in r:
            if path.name.startswith("autoattack"):
                family = "AutoAttack" if r.get("version") == "standard" else "AutoAttack (subset)"
            else:
                family = f"{r.get('attack', 'pgd').upper()}-{r.get('steps', '?')}"
            key = (family, r.get("norm", "Linf"), r["eps_float"])
            points.setdefault(key, []).append((path, r))
    sweeps, notes, drawn = [], [], []
    for norm, found in audits.items():
        _, r, note = fullest(found, f"{run}: {norm} eps sweep")
        sweeps.append((norm, r["sweep"]["eps"], r["sweep"]["robust_acc"]))
        if "autoattack" in r:
            drawn.append(("AutoAttack (audit)", norm, r["eps_float"],
                          r["autoattack"]["robust_acc"]))
        notes += [note] if note else []
    for (family, norm, eps), found in points.items():
        _, r, note = fullest(found, f"{run}: {family} at {norm} eps {eps:.6g}")
        drawn.append((family, norm, eps, r["robust_acc"]))
        notes += [note] if note else []
    return {"points": drawn, "sweeps": sweeps, "notes": notes}


def _scale(norm: str) -> tuple[float, str]:
    return (255.0, "eps (x 1/255)") if norm == "Linf" else (1.0, "eps")


def draw(runs: list[tuple[str, dict]], path: Path, norm: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = [p[1] for _, r in runs for p in r["points"]] + [s[0] for _, r in runs
                                                            for s in r["sweeps"]]
    if not norms:
        raise EvalError("no results to plot (run eval.pgd, eval.autoattack or eval.audit first)")
    norm = norm or max(set(norms), key=norms.count)
    if norm not in norms:  # an empty figure would look like a result
        raise EvalError(f"no {norm} results to plot (there are {', '.join(sorted(set(norms)))})")
    factor, xlabel = _scale(norm)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    markers = {"AutoAttack": "*", "AutoAttack (audit)": "*", "AutoAttack (subset)": "P"}
    for i, (label, r) in enumerate(runs):
        color = f"C{i}"
        for s_norm, eps, acc in r["sweeps"]:
            if s_norm == norm:
                ax.plot([e * factor for e in eps], acc, "-", color=color, alpha=0.8,
                        label=f"{label}: PGD eps sweep" if label else "PGD eps sweep")
        families = sorted({p[0] for p in r["points"] if p[1] == norm})
        for family in families:
            pts = sorted((e, a) for f, n, e, a in r["points"] if f == family and n == norm)
            ax.plot([e * factor for e, _ in pts], [a for _, a in pts], markers.get(family, "o"),
                    color=color, markersize=10 if "*" == markers.get(family) else 6,
                    linestyle="--" if len(pts) > 1 else "",
                    label=f"{label}: {family}" if label else family)
    ax.set_xlabel(f"{norm} {xlabel}")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path, dpi=150)  # in the format of path's suffix, never half-written
    plt.close(fig)
    return path


def parse_norm(text: str | None) -> str | None:
    """--norm in any case (linf, as the configs write it, or Linf) as the result files spell it;
    None stays None."""
    if text is None:
        return None
    if text.lower() not in NORMS:
        raise EvalError(f"unknown norm {text!r}; valid: "
                        f"{', '.join(autoattack_norm(n) for n in NORMS)}")
    return autoattack_norm(text.lower())


def robustness_png(out_dir: Path, weights: str, norm: str | None = None) -> Path:
    """<out_dir>/robustness_<weights>.png from the results in out_dir."""
    return draw([("", collect(out_dir, weights))], out_dir / f"robustness_{weights}.png", norm)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, results directories or RobustBench "
                   "entries rb:<dataset>/<threat>/<Name> (docs/zoo.md)")
    p.add_argument("--model-dir", default="models", help="RobustBench checkpoints' directory "
                   "(rb: entries' results are in <model-dir>/../zoo)")
    p.add_argument("--weights", default="best")
    p.add_argument("--norm", help="Linf | L2 | L1, in any case (default: the one with the most "
                   "results)")
    p.add_argument("--labels", help="comma-separated legend labels, one per run")
    p.add_argument("--out", type=Path, help="figure path (required for several runs); its "
                   "suffix sets the format (.png, .pdf, .svg, ...)")
    args = p.parse_args(argv)
    try:
        if any(is_zoo(r) for r in args.runs) and args.weights == "best":
            args.weights = WEIGHTS  # the label zoo results carry in their file names
        args.runs = [results_dir(r, args.model_dir) if is_zoo(r) else Path(r) for r in args.runs]
        norm = parse_norm(args.norm)
        if args.out is not None:
            figure_format(args.out)  # a suffix it cannot write is refused before any work
        labels = args.labels.split(",") if args.labels else [r.name for r in args.runs]
        if len(labels) != len(args.runs):
            raise EvalError(f"--labels gives {len(labels)} labels for {len(args.runs)} runs")
        if len(args.runs) > 1 and args.out is None:
            raise EvalError("several runs: say where the overlay goes with --out fig.png")
        collected = [(label if len(args.runs) > 1 else "", collect(run, args.weights))
                     for label, run in zip(labels, args.runs)]
        out = args.out or _results_dir(args.runs[0]) / f"robustness_{args.weights}.png"
        path = draw(collected, out, norm)
    except USER_ERRORS as err:
        return report("eval.plot", err)
    for _, r in collected:
        for note in r["notes"]:
            print(f"eval.plot: {note}", file=sys.stderr)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
