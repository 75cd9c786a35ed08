"""One table of every evaluation result of a run: clean and robust accuracy per attack.

    python -m eval.summary runs/cifar100_ikl_at
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def collect(run_dir: Path) -> list[dict]:
    """The eval/*.json results of a run (PGD / CW / AutoAttack), sorted by weights and name."""
    rows = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        result = json.loads(path.read_text())
        if "robust_acc" not in result:
            continue
        if "version" in result:
            attack = "AutoAttack" if result["version"] != "custom" else \
                "AA " + "+".join(result["attacks"])
            if result["version"] not in ("standard", "custom"):
                attack += f" ({result['version']})"
        else:
            attack = f"{result['attack'].upper()}-{result['steps']}"
        rows.append({"weights": result["weights"], "attack": attack, "eps": result["eps"],
                     "norm": result["norm"], "n_ex": result["n_ex"],
                     "clean": result["clean_acc"], "robust": result["robust_acc"]})
    return rows


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
    rows = collect(Path(args.run_dir))
    if not rows:
        print(f"eval.summary: error: no evaluation results in {Path(args.run_dir) / 'eval'}",
              file=sys.stderr)
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
