"""Results in one table.

    python -m eval.summary runs/cifar100_ikl_at           # one run: every evaluation result
    python -m eval.summary runs/sweeps/digits_beta        # a sweep root, or several runs:
    python -m eval.summary RUN RUN ... --format csv --plot sweep.png

One run directory: clean and robust accuracy of each attack, eps and weights it was evaluated
with. Several runs or a root: one row per point (runs differing only in their seed), the config
keys that differ, validation PGD (best / last epoch, averaged weights), test clean / PGD,
AutoAttack and audit verdict, mean ± std over seeds, ranked by validation robust accuracy, with
the gap to the config's `reported:` target (docs/sweeps.md). Warnings go to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from errors import USER_ERRORS, EvalError, report

from . import confidence, runs_table
from .figures import figure_format
from .zoo_target import is_zoo, results_dir


def _read(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalError(f"{path} is unreadable ({err}); re-create or remove it") from None
    if not isinstance(result, dict):
        raise EvalError(f"{path} holds no result object; re-create or remove it")
    return result


def _final_rows(run_dir: Path) -> list[dict]:
    """The end-of-training PGD rows of final.json (written by at.train), so that a run has a
    table before any eval.* command ran; eps and attack come from the run's config.yaml when
    final.json predates recording them."""
    path = run_dir / "final.json"
    if not path.is_file():
        return []
    config = {}
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    attack, ev = config.get("attack", {}), config.get("eval", {})
    rows = []
    for weights, row in _read(path).items():
        if not isinstance(row, dict) or row.get("test_robust_acc") is None:
            continue
        eps, norm = row.get("eps", attack.get("eps")), row.get("norm", attack.get("norm"))
        rows.append({"weights": weights,
                     "attack": f"PGD-{row.get('pgd_steps', ev.get('pgd_steps', '?'))} (final)",
                     "eps": f"{eps * 255:.4g}/255" if isinstance(eps, float) else str(eps),
                     # As the eval results spell it (eval.common.autoattack_norm: Linf).
                     "norm": norm.capitalize() if isinstance(norm, str) else "?",
                     "n_ex": row.get("n_test", "?"), "clean": row["test_clean_acc"],
                     "robust": row["test_robust_acc"]})
    return rows


def collect(run_dir: Path) -> list[dict]:
    """The eval/*.json results of a run (PGD / CW / AutoAttack; every eps, number of images and
    weights, each in its own file), sorted by file name, after final.json's rows."""
    if not run_dir.is_dir():
        raise EvalError(f"{run_dir} is not a directory (expected a run directory)")
    rows = _final_rows(run_dir)
    # A run keeps its results in eval/; a RobustBench entry's results directory is itself one.
    results = run_dir / "eval" if (run_dir / "eval").is_dir() else run_dir
    for path in sorted(results.glob("*.json")):
        result = _read(path)
        if "robust_acc" not in result:
            continue
        try:
            rows.append(_row(result))
        except (KeyError, TypeError) as err:
            raise EvalError(f"{path} is not an eval result (no {err}); re-create or "
                               f"remove it") from None
    return rows


def _row(result: dict) -> dict:
    """One table row of an eval.* result file."""
    if "version" in result:
        attack = "AutoAttack" if result["version"] != "custom" else \
            "AA " + "+".join(result["attacks"])
        if result["version"] not in ("standard", "custom"):
            attack += f" ({result['version']})"
    else:
        attack = f"{result['attack'].upper()}-{result['steps']}"
    return {"weights": result["weights"], "attack": attack, "eps": result["eps"],
            "norm": result["norm"], "n_ex": result["n_ex"],
            "clean": result["clean_acc"], "robust": result["robust_acc"],
            "robust_ci95": result.get("robust_ci95") or (
                confidence.of_percent(result["robust_acc"], result["n_ex"])
                if isinstance(result["n_ex"], int) else None)}


def table(rows: list[dict]) -> str:
    lines = [f"{'weights':<8} {'attack':<24} {'eps':>7} {'norm':>5} {'images':>7} "
             f"{'clean':>7} {'robust':>7}  95% CI"]
    for r in rows:
        ci = r.get("robust_ci95")
        lines.append((f"{r['weights']:<8} {r['attack']:<24} {r['eps']:>7} {r['norm']:>5} "
                      f"{r['n_ex']:>7} {r['clean']:>7.2f} {r['robust']:>7.2f}  "
                      f"{f'[{ci[0]:.2f}, {ci[1]:.2f}]' if ci else '-':<15}").rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_OR_ROOT",
                   help="run directories and/or directories holding runs (a sweep's out_root)")
    p.add_argument("--format", choices=("md", "csv", "json"),
                   help="several runs: markdown (default), csv or json")
    p.add_argument("--per-run", action="store_true",
                   help="several runs: one row per run instead of per point (seed group)")
    p.add_argument("--plot", metavar="FIG", help="also plot robust vs clean accuracy (the "
                   "suffix sets the format: .png, .pdf, .svg, ...)")
    p.add_argument("--model-dir", default="models", help="RobustBench checkpoints' directory "
                   "(rb: targets' results are in <model-dir>/../zoo)")
    args = p.parse_args(argv)
    try:  # rb:<dataset>/<threat>/<Name>: the entry's results directory (docs/zoo.md)
        paths = [results_dir(x, args.model_dir) if is_zoo(x) else Path(x) for x in args.paths]
    except USER_ERRORS as err:
        return report("eval.summary", err)
    single = len(paths) == 1 and ((paths[0] / "config.yaml").is_file() or is_zoo(
        args.paths[0])) and not (args.format or args.plot or args.per_run)
    if not single:
        return _many(paths, args)
    try:
        rows = collect(paths[0])
        if not rows:
            raise EvalError(f"no evaluation results in {paths[0]} (final.json or "
                               f"eval/*.json)")
    except USER_ERRORS as err:
        return report("eval.summary", err)
    print(table(rows))
    return 0


def _many(paths: list[Path], args: argparse.Namespace) -> int:
    """The comparison table of several runs (runs_table)."""
    try:
        if args.plot:
            figure_format(Path(args.plot))  # a suffix it cannot write, before any work
        runs = [runs_table.read_run(p) for p in runs_table.find_runs(paths)]
        runs, copies = runs_table.drop_copies(runs)
        if args.per_run:  # every run its own group: give each a distinct (neutral-free) key
            for i, r in enumerate(runs):
                r.config["_run"] = i
        groups, differing = runs_table.group_runs(runs)
        if args.per_run:  # the seed tells the runs of a point apart
            differing = ["seed", *(k for k in differing if k != "_run")]
            for g in groups:
                g.label.pop("_run", None)
                g.label["seed"] = g.runs[0].config.get("seed")
        if args.plot:
            runs_table.plot(groups, differing, Path(args.plot))
    except (*USER_ERRORS, OSError) as err:  # an unreadable file of a run, too
        return report("eval.summary", err)
    for note in copies + [n for r in runs for n in r.notes]:
        print(f"eval.summary: {note}", file=sys.stderr)
    warnings = runs_table.eps_warnings(runs)
    for w in warnings:
        print(f"eval.summary: warning: {w}", file=sys.stderr)
    rows = runs_table.records(groups, differing)
    if args.format == "json":
        print(json.dumps({"groups": rows, "differing_keys": differing, "warnings": warnings,
                          "copies": copies}, indent=2, default=str))
    elif args.format == "csv":
        print(runs_table.csv_text(rows), end="")
    else:
        print(runs_table.markdown(groups, differing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
