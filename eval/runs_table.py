"""Many runs in one table: what `python -m eval.summary RUN_OR_ROOT ...` prints for several runs
or a sweep root (docs/sweeps.md).

Runs whose configs differ only in the seed (and in keys that do not change the experiment: paths,
devices, logging) form a group, shown as mean ± sample standard deviation over its seeds. Groups
are ranked by validation PGD accuracy, never by a test number (choosing on the test set would
overstate the winner). Each group is compared with the `reported:` block of its config; a gap is
flagged when it exceeds the seed spread (the standard deviation over seeds).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from errors import EvalError

from .results import fullest

# Keys that do not change what a run trains: runs differing only in these are seeds of a point.
NEUTRAL = ("seed", "out_dir", "device", "data.root", "data.download", "data.workers",
           "data.lists", "log.", "checkpoint.", "eval.batch_size", "speed.compile",
           "train.skip_nonfinite")
EPS_TOLERANCE = 1e-6  # 0.031 and 8/255 (0.031373) differ by 4e-4: far above rounding noise
METRICS = ("val_pgd_best", "val_pgd_last", "val_pgd_avg", "test_clean", "test_pgd",
           "autoattack")
TITLES = {"val_pgd_best": "val PGD best", "val_pgd_last": "val PGD last",
          "val_pgd_avg": "val PGD avg", "test_clean": "test clean", "test_pgd": "test PGD",
          "autoattack": "AutoAttack"}



@dataclass
class RunResult:
    path: Path
    config: dict  # flattened dotted keys (provenance dropped)
    metrics: dict[str, float | None]
    audit: str | None = None
    eval_eps: list[tuple[str, float]] = field(default_factory=list)  # (what, eps) evaluated at
    stopped_epoch: int | None = None
    notes: list[str] = field(default_factory=list)  # which result file was used, of several
    weights_sha256: str | None = None  # of best.pt (else last.pt): tells a copied run


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalError(f"{path} is unreadable ({err}); re-create or remove it") from None


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (holding config.yaml) given directly or anywhere under a root."""
    runs: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise EvalError(f"{path} is not a directory (expected a run directory or a sweep "
                            f"root)")
        found = [path] if (path / "config.yaml").is_file() else sorted(
            p.parent for p in path.rglob("config.yaml"))
        if not found:
            raise EvalError(f"no runs in {path} (no config.yaml in it or below it)")
        runs += [p for p in found if p not in runs]
    return runs


def read_run(path: Path) -> RunResult:
    try:
        raw = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise EvalError(f"{path / 'config.yaml'} is unreadable ({err})") from None
    # Fractions such as 8/255 in hand-written files. Imported here: at.config brings in torch,
    # which a summary otherwise never needs.
    from at.config import flatten, parse_value
    config = parse_value(flatten({k: v for k, v in raw.items() if not str(k).startswith("_")},
                                 keep=("reported",)))
    records = []
    if (path / "metrics.jsonl").is_file():
        try:
            records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()
                       if x.strip()]
        except (OSError, json.JSONDecodeError) as err:
            raise EvalError(f"{path / 'metrics.jsonl'} is unreadable ({err})") from None
    val = [r["val_robust_acc"] for r in records if r.get("val_robust_acc") is not None]
    avg = [r["avg_val_robust_acc"] for r in records if r.get("avg_val_robust_acc") is not None]
    m: dict[str, float | None] = dict.fromkeys(METRICS)
    m["val_pgd_best"] = max(val) if val else None
    m["val_pgd_last"] = val[-1] if val else None
    m["val_pgd_avg"] = avg[-1] if avg else None
    result = RunResult(path, config, m)
    weights = next((path / n for n in ("best.pt", "last.pt") if (path / n).is_file()), None)
    if weights is not None:
        from at.target import sha256
        result.weights_sha256 = sha256(weights)
    if (path / "final.json").is_file():
        final = _json(path / "final.json")
        row = final.get("best") or final.get("last") or {}
        m["test_clean"] = row.get("test_clean_acc")
        m["test_pgd"] = row.get("test_robust_acc")
        if row.get("eps") is not None:
            result.eval_eps.append(("final.json PGD", row["eps"]))
        result.stopped_epoch = (final.get("early_stop") or {}).get("stopped_epoch")
    found = [(p, _json(p)) for p in sorted((path / "eval").glob("*.json"))] \
        if (path / "eval").is_dir() else []
    found = [(p, r) for p, r in found if isinstance(r, dict)]
    # Several AutoAttack results or audits: the best weights' full-budget one, named in a note.
    weights = [(p, r) for p, r in found if r.get("weights", "best") == "best"]
    aa = [(p, r) for p, r in (weights if any("version" in r for _, r in weights) else found)
          if "version" in r and r.get("robust_acc") is not None]
    if aa:
        _, chosen, note = fullest(aa, f"{path}: AutoAttack")
        result.notes += [note] if note else []
        m["autoattack"] = chosen["robust_acc"]
        eps = chosen.get("eps_float", chosen.get("eps"))
        if isinstance(eps, (int, float)):
            result.eval_eps.append(("AutoAttack", float(eps)))
    for _, r in found:
        if "version" not in r and isinstance(r.get("eps_float"), float):
            result.eval_eps.append((f"{str(r.get('attack', 'pgd')).upper()}-{r.get('steps')}",
                                    r["eps_float"]))
    audits = [(p, r) for p, r in found if p.name.startswith("audit") and "verdict" in r]
    best_audits = [(p, r) for p, r in audits if r.get("weights", "best") == "best"] or audits
    if best_audits:
        _, chosen, note = fullest(best_audits, f"{path}: audit verdict")
        result.notes += [note] if note else []
        result.audit = str(chosen.get("verdict"))
    return result


def drop_copies(runs: list[RunResult]) -> tuple[list[RunResult], list[str]]:
    """The runs with copies left out: a run with the seed and the weights (file hash) of an
    earlier one is the same run (copied, or trained twice identically) and would pool as two
    seeds with no spread. Returns (kept, one note per copy naming both)."""
    kept, seen, notes = [], {}, []
    for run in runs:
        key = (json.dumps(run.config.get("seed")), run.weights_sha256)
        if run.weights_sha256 is not None and key in seen:
            notes.append(f"{run.path} is a copy of {seen[key].path} (seed "
                         f"{run.config.get('seed')}, same weights): counted once")
            continue
        seen[key] = run
        kept.append(run)
    return kept, notes


def _neutral(key: str) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in NEUTRAL)


@dataclass
class Group:
    key: tuple
    runs: list[RunResult]
    label: dict[str, Any]  # the differing keys' values
    stats: dict[str, tuple[float | None, float | None, int]]  # metric -> (mean, std, n)
    reported: dict | None
    gaps: dict[str, dict] = field(default_factory=dict)


def _stat(values: list[float | None]) -> tuple[float | None, float | None, int]:
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs)


def group_runs(runs: list[RunResult]) -> tuple[list[Group], list[str]]:
    """Groups (ranked by validation PGD, best first) and the config keys that differ."""
    experiment = [{k: v for k, v in r.config.items() if not _neutral(k)} for r in runs]
    keys = sorted({k for e in experiment for k in e})
    differing = [k for k in keys if k != "reported" and len(
        {json.dumps(e.get(k), sort_keys=True, default=str) for e in experiment}) > 1]
    by_key: dict[tuple, list[RunResult]] = {}
    for run, e in zip(runs, experiment):
        by_key.setdefault(tuple(json.dumps(e.get(k), sort_keys=True, default=str)
                                for k in keys), []).append(run)
    groups = []
    for key, members in by_key.items():
        stats = {m: _stat([r.metrics[m] for r in members]) for m in METRICS}
        reported = members[0].config.get("reported")
        group = Group(key, members, {k: members[0].config.get(k) for k in differing}, stats,
                      reported if isinstance(reported, dict) else None)
        _compare(group)
        groups.append(group)
    # Validation accuracy decides the ranking; test numbers only describe.
    groups.sort(key=lambda g: -math.inf if g.stats["val_pgd_best"][0] is None
                else g.stats["val_pgd_best"][0], reverse=True)
    return groups, differing


def _compare(group: Group) -> None:
    """Gaps to the reported target: ours - reported, flagged when larger than the seed spread."""
    rep = group.reported
    if not rep:
        return
    pairs = [("clean", "test_clean", rep.get("clean"))]
    if rep.get("autoattack") is not None:
        # PGD only bounds AutoAttack from above: compare with it only when there is no AA run.
        ours = "autoattack" if group.stats["autoattack"][0] is not None else "test_pgd"
        pairs.append(("autoattack", ours, rep["autoattack"]))
    for name, metric, target in pairs:
        mean, std, n = group.stats[metric]
        if mean is None or target is None:
            continue
        gap = mean - target
        group.gaps[name] = {"ours": metric, "reported": target, "gap": gap, "spread": std,
                            "n": n, "beyond_spread": None if std is None else abs(gap) > std}


def eps_warnings(runs: list[RunResult]) -> list[str]:
    """Training radius vs the radii the run was evaluated at and its reported target's."""
    out = []
    for r in runs:
        train = r.config.get("attack.eps")
        if not isinstance(train, (int, float)):
            continue
        seen = list(r.eval_eps)
        rep = r.config.get("reported")
        if isinstance(rep, dict) and isinstance(rep.get("eps"), (int, float)):
            seen.append(("reported AutoAttack", float(rep["eps"])))
        for what, eps in seen:
            if abs(eps - train) > EPS_TOLERANCE:
                out.append(f"{r.path}: trained at eps {_eps(train)} but {what} is at "
                           f"eps {_eps(eps)}: the numbers are not comparable")
    return out


def _eps(value: float) -> str:
    k = value * 255
    return f"{k:.4g}/255" if abs(k - round(k)) < 1e-6 else f"{value:.4g}"


# ---- output -----------------------------------------------------------------------------------
def _fmt(stat: tuple[float | None, float | None, int], total: int) -> str:
    mean, std, n = stat
    if mean is None:
        return "-"
    text = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
    return text if n == total else f"{text} ({n})"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return _eps(v) if v < 1 and abs(v * 255 - round(v * 255)) < 1e-9 and v != 0 else f"{v:g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _gap_text(g: dict | None) -> str:
    if not g:
        return "-"
    text = f"{g['gap']:+.2f}"
    if g["ours"] == "test_pgd":
        text += " (PGD)"
    if g["beyond_spread"]:
        return f"**{text}**"
    return text if g["beyond_spread"] is not None else f"{text} (1 seed)"


def markdown(groups: list[Group], differing: list[str]) -> str:
    shown = [m for m in METRICS if any(g.stats[m][0] is not None for g in groups)]
    audit = any(r.audit for g in groups for r in g.runs)
    reported = any(g.reported for g in groups)
    head = ["rank", *differing, "n", *(TITLES[m] for m in shown)]
    head += ["audit"] if audit else []
    head += ["reported clean / AA", "gap clean", "gap robust"] if reported else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, g in enumerate(groups, 1):
        n = len(g.runs)
        row = [str(i), *(_value(g.label[k]) for k in differing), str(n),
               *(_fmt(g.stats[m], n) for m in shown)]
        if audit:
            row.append(", ".join(sorted({str(r.audit) for r in g.runs if r.audit})) or "-")
        if reported:
            rep = g.reported or {}
            row += [f"{rep['clean']:.2f} / "
                    f"{'-' if rep.get('autoattack') is None else format(rep['autoattack'], '.2f')}"
                    if rep else "-", _gap_text(g.gaps.get("clean")),
                    _gap_text(g.gaps.get("autoattack"))]
        lines.append("| " + " | ".join(row) + " |")
    notes = ["", "Mean ± standard deviation over seeds; (k): only k runs have the number. "
                 "Ranked by validation PGD accuracy (best epoch)."]
    if reported:
        notes.append("Gaps are ours − reported; **bold**: larger than the seed spread; "
                     "(PGD): no AutoAttack result, test PGD (an upper bound) compared instead.")
    return "\n".join(lines + notes)


def records(groups: list[Group], differing: list[str]) -> list[dict]:
    out = []
    for i, g in enumerate(groups, 1):
        row: dict[str, Any] = {"rank": i, **{k: g.label[k] for k in differing},
                               "n": len(g.runs), "runs": [str(r.path) for r in g.runs],
                               "seeds": [r.config.get("seed") for r in g.runs]}
        for m in METRICS:
            mean, std, n = g.stats[m]
            row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": n})
        row["audit"] = sorted({str(r.audit) for r in g.runs if r.audit}) or None
        row["stopped_epochs"] = [r.stopped_epoch for r in g.runs]
        row["reported"] = g.reported
        for name in ("clean", "autoattack"):
            gap = g.gaps.get(name)
            row[f"gap_{name}"] = None if gap is None else gap["gap"]
            row[f"gap_{name}_beyond_spread"] = None if gap is None else gap["beyond_spread"]
        out.append(row)
    return out


def csv_text(rows: list[dict]) -> str:
    import csv
    import io
    flat = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()}
            for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flat[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def plot(groups: list[Group], differing: list[str], path: Path) -> None:
    """Robust vs clean test accuracy: one dot per run, each group's mean with error bars over its
    seeds (AutoAttack where every run has it, else test PGD)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import figure_format, save

    figure_format(path)  # refused before anything is drawn
    robust = "autoattack" if all(r.metrics["autoattack"] is not None
                                 for g in groups for r in g.runs) else "test_pgd"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, g in enumerate(groups):
        colour = f"C{i % 10}"
        xs = [r.metrics["test_clean"] for r in g.runs]
        ys = [r.metrics[robust] for r in g.runs]
        pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
        if not pts:
            continue
        ax.scatter(*zip(*pts), s=14, alpha=0.5, color=colour)
        (mx, sx, _), (my, sy, _) = g.stats["test_clean"], g.stats[robust]
        label = ", ".join(f"{k.split('.')[-1]}={_value(g.label[k])}" for k in differing) \
            or f"group {i + 1}"
        ax.errorbar(mx, my, xerr=sx or 0, yerr=sy or 0, fmt="o", color=colour, capsize=3,
                    label=f"{label} (n={len(g.runs)})")
    ax.set(xlabel="test clean accuracy (%)", ylabel=f"test {TITLES[robust]} accuracy (%)"
           if robust == "autoattack" else "test PGD accuracy (%)",
           title="robust vs clean accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path, dpi=80)  # in the format of path's suffix
    plt.close(fig)
