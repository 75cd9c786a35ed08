"""The `reported:` block of a config: the published row a config aims at, machine-readable.

    reported:
      clean: 85.31              # clean top-1 test accuracy, % (required)
      autoattack: 57.13         # AutoAttack robust accuracy, %; null for a non-robust row (KD)
      norm: linf                # threat model of the AutoAttack number: linf | l2
      eps: 8/255                # its radius on the [0,1] scale (some papers evaluated at 0.031)
      source: DKL README        # where the numbers come from (required)
      seeds: null               # the seeds the paper averaged, if stated (list of ints)
      runs: null                # how many runs it averaged, if stated

`eval.summary` compares a run's (or a seed group's) accuracies with this block; see docs/sweeps.md.
"""
from __future__ import annotations

import math
from typing import Any

from attacks.pgd import NORMS
from errors import ConfigError

FIELDS = ("clean", "autoattack", "norm", "eps", "source", "seeds", "runs")


def _percent(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ConfigError(f"reported.{name} must be a percentage in [0, 100], got {value!r}"
                            f"{where}")
    return float(value)


def check_reported(block: Any, source: str = "") -> dict | None:
    """Validate a `reported:` block (after fraction parsing); returns it with numbers as floats,
    or None when the config has no block."""
    where = f" (from {source})" if source else ""
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ConfigError(f"reported must be a mapping of {', '.join(FIELDS)}, got "
                            f"{block!r}{where}")
    unknown = [str(k) for k in block if k not in FIELDS]
    if unknown:
        raise ConfigError(f"reported: unknown field {unknown[0]!r}{where}; known fields: "
                            f"{', '.join(FIELDS)}")
    out: dict = {k: block.get(k) for k in FIELDS}
    if out["clean"] is None:
        raise ConfigError(f"reported.clean is required (the published clean accuracy){where}")
    out["clean"] = _percent("clean", out["clean"], where)
    if not isinstance(out["source"], str) or not out["source"].strip():
        raise ConfigError(f"reported.source is required (where the numbers come from){where}")
    if out["autoattack"] is not None:
        out["autoattack"] = _percent("autoattack", out["autoattack"], where)
        # A robust number means nothing without its threat model.
        if out["norm"] not in NORMS:
            raise ConfigError(f"reported.norm must be one of {', '.join(NORMS)} when "
                                f"reported.autoattack is given, got {out['norm']!r}{where}")
        eps = out["eps"]
        # L-inf radii are below 1 on the [0,1] scale; L2 and L1 ones need not be (AutoAttack's
        # L1 default is 12).
        upper = 1 if out["norm"] == "linf" else math.inf
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < upper:
            span = "(0, 1) on the [0,1] scale (e.g. 8/255)" if upper == 1 else \
                "> 0 and finite (e.g. 0.5 for l2, 12 for l1)"
            raise ConfigError(f"reported.eps must be a radius {span} when "
                                f"reported.autoattack is given, got {eps!r}{where}")
        out["eps"] = float(eps)
    elif out["norm"] is not None or out["eps"] is not None:
        raise ConfigError(f"reported.norm / reported.eps describe the AutoAttack number; give "
                            f"reported.autoattack too{where}")
    seeds = out["seeds"]
    if seeds is not None and (not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"reported.seeds must be a non-empty list of integers, got "
                            f"{seeds!r}{where}")
    runs = out["runs"]
    if runs is not None and (isinstance(runs, bool) or not isinstance(runs, int) or runs < 1):
        raise ConfigError(f"reported.runs must be an integer >= 1, got {runs!r}{where}")
    if seeds is not None and runs is not None and len(seeds) != runs:
        raise ConfigError(f"reported.seeds lists {len(seeds)} seeds but reported.runs is "
                            f"{runs}{where}")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ConfigError(f"reported.seeds repeats a seed: {seeds}{where}")
    return out
