"""Result files keyed by everything that defines them, and which one a reader uses.

Every evaluation writes its own file per setting (attack, norm, eps, number of images, weights,
budget, subset: `common.result_name`), so a quick or partial evaluation never replaces a full one.
A reader that needs one number of a kind (the plot's eps sweep, the summary's AutoAttack column
and audit verdict, the export) takes the fullest of them (`fullest`) and says which file it used
when there was a choice (docs/evaluation.md#result-files).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .common import result_name


def audit_name(norm: str, eps: float, n_ex: int, weights: str, quick: bool) -> str:
    """audit_linf_eps8-255_n1000_best, or audit-quick_... for the smoke-test budgets."""
    return result_name("audit-quick" if quick else "audit", norm, eps, n_ex, weights)


def corruptions_name(corruptions: list[str], every: list[str], severities: list[int],
                     n_ex: int, weights: str) -> str:
    """corruptions_n10000_best for all corruptions and severities; a subset gets its own name:
    corruptions-fog+snow_s12_n500_best (more than three corruptions: their count and a hash)."""
    if list(corruptions) == list(every) and list(severities) == [1, 2, 3, 4, 5]:
        return f"corruptions_n{n_ex}_{weights}"
    if len(corruptions) <= 3:
        which = "+".join(corruptions)
    else:
        digest = hashlib.sha256(",".join(corruptions).encode()).hexdigest()[:8]
        which = f"{len(corruptions)}of{len(every)}-{digest}"
    return f"corruptions-{which}_s{''.join(str(s) for s in severities)}_n{n_ex}_{weights}"


def budget(result: dict) -> tuple:
    """Orders results of one kind: full attack budgets first (not --quick, AutoAttack's
    standard version), then the whole test set or benchmark, then more images."""
    return (not result.get("quick", False),
            result.get("version", "standard") == "standard",
            bool(result.get("full_test_set", result.get("full_benchmark", False))),
            int(result.get("n_ex") or 0))


def describe(result: dict) -> str:
    parts = [f"{result.get('n_ex', '?')} images"]
    if result.get("quick"):
        parts.append("quick budgets")
    if result.get("version") not in (None, "standard"):
        parts.append(f"AutoAttack {result['version']}")
    return ", ".join(parts)


def fullest(found: list[tuple[Path, dict]], what: str) -> tuple[Path, dict, str | None]:
    """The full-budget result of `found` (path, result) and, when there were several, a note
    naming the one used: "<what>: used <file> (<n> images) of 3 results"."""
    path, result = max(found, key=lambda pr: (budget(pr[1]), pr[0].name))
    if len(found) == 1:
        return path, result, None
    others = ", ".join(p.name for p, _ in found if p != path)
    return path, result, (f"{what}: used {path.name} ({describe(result)}); not {others}")
