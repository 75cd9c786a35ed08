"""One table of every evaluation result of a run: clean and robust accuracy per attack.

    python -m eval.summary runs/cifar100_ikl_at
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from at.errors import USER_ERRORS, UserError, report


class SummaryError(UserError, RuntimeError):
    """A run directory or result file that cannot be summarised; the message is one line."""


def _read(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SummaryError(f"{path} is unreadable ({err}); re-create or remove it") from None
    if not isinstance(result, dict):
        raise SummaryError(f"{path} holds no result object; re-create or remove it")
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
        eps = row.get("eps", attack.get("eps"))
        rows.append({"weights": weights,
                     "attack": f"PGD-{row.get('pgd_steps', ev.get('pgd_steps', '?'))} (final)",
                     "eps": f"{eps * 255:.4g}/255" if isinstance(eps, float) else str(eps),
                     "norm": {"linf": "Linf", "l2": "L2"}.get(
                         row.get("norm", attack.get("norm")), "?"),
                     "n_ex": row.get("n_test", "?"), "clean": row["test_clean_acc"],
                     "robust": row["test_robust_acc"]})
    return rows


def collect(run_dir: Path) -> list[dict]:
    """The eval/*.json results of a run (PGD / CW / AutoAttack; every eps, number of images and
    weights, each in its own file), sorted by file name, after final.json's rows."""
    if not run_dir.is_dir():
        raise SummaryError(f"{run_dir} is not a directory (expected a run directory)")
    rows = _final_rows(run_dir)
    for path in sorted((run_dir / "eval").glob("*.json")):
        result = _read(path)
        if "robust_acc" not in result:
            continue
        try:
            rows.append(_row(result))
        except (KeyError, TypeError) as err:
            raise SummaryError(f"{path} is not an eval result (no {err}); re-create or "
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
            "clean": result["clean_acc"], "robust": result["robust_acc"]}


def table(rows: list[dict]) -> str:
    lines = [f"{'weights':<8} {'attack':<24} {'eps':>7} {'norm':>5} {'images':>7} "
             f"{'clean':>7} {'robust':>7}"]
    for r in rows:
        lines.append(f"{r['weights']:<8} {r['attack']:<24} {r['eps']:>7} {r['norm']:>5} "
                     f"{r['n_ex']:>7} {r['clean']:>7.2f} {r['robust']:>7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    try:
        rows = collect(Path(args.run_dir))
        if not rows:
            raise SummaryError(f"no evaluation results in {Path(args.run_dir)} (final.json or "
                               f"eval/*.json)")
    except USER_ERRORS as err:
        return report("eval.summary", err)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
