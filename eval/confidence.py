"""95 % Clopper–Pearson intervals for accuracies measured on a subset of a test set, and the
comparisons made with them (docs/zoo.md#confidence-intervals).

An accuracy of k correct out of n images estimates the accuracy on the whole distribution; the
Clopper–Pearson interval (Clopper & Pearson, Biometrika 1934) is the exact binomial one: its
lower end is the p at which P(X >= k) = alpha/2, its upper end the p at which P(X <= k) =
alpha/2, X ~ Binomial(n, p). It is conservative (covers at least 95 %).
"""
from __future__ import annotations

LEVEL = 0.95


def interval(k: int, n: int, level: float = LEVEL) -> list[float]:
    """[low, high] in percent for k successes out of n (0 <= k <= n, n >= 1); a list, as JSON
    reads it back, so a result and its saved file compare equal."""
    if not (n >= 1 and 0 <= k <= n):
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    from scipy.stats import beta  # here: importing scipy.stats takes most of a second
    alpha = 1 - level
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return [round(100 * low, 2), round(100 * high, 2)]


def of_percent(acc: float, n: int) -> list[float]:
    """The interval of an accuracy given in percent of n images (rounded to whole images)."""
    return interval(round(acc * n / 100), n)


def outside(claim: float | None, ci: list[float]) -> bool | None:
    """Whether a claimed accuracy (percent) lies outside the interval: only then is the gap
    between claim and measurement significant. None when there is no claim."""
    if claim is None:
        return None
    return not ci[0] <= claim <= ci[1]


def against_threshold(value: float, n: int, threshold: float) -> tuple[str, list[float]]:
    """'warn' when the interval of `value` (a share of n points, in percent or percentage
    points) lies above `threshold`, 'pass' when it lies at or below it, 'inconclusive' when it
    straddles it. A zero threshold asks whether any point at all shows the problem: one point
    is then proof and none is a pass, whatever the interval."""
    ci = of_percent(max(value, 0.0), n)
    if threshold == 0:
        return ("warn" if value > 0 else "pass"), ci
    if ci[0] > threshold:
        return "warn", ci
    if ci[1] <= threshold:
        return "pass", ci
    return "inconclusive", ci


# Audit checks whose value is a share of the audited points (percent or percentage points); the
# others (determinism, AutoAttack's flags) are not proportions and keep their plain comparison.
SHARE_CHECKS = ("pgd_vs_autoattack", "convergence", "transfer", "eps_sweep", "unbounded",
                "zero_gradients", "batchnorm_modes")


def qualify_checks(checks: list[dict], n: int, n_correct: int) -> str:
    """Compare each share check's 95 % interval with its threshold, in place: status 'warn' when
    the interval lies above it, 'pass' at or below, 'inconclusive' when it straddles (the
    explanation then says so, with n). A warn raised by another criterion of the check than its
    value (eps_sweep's rise with eps) stays. Returns the verdict: 'warn' if any check warns,
    else 'inconclusive' if any is, else 'pass'."""
    for c in checks:
        if c["name"] not in SHARE_CHECKS:
            continue
        points = n_correct if c["name"] == "zero_gradients" else n
        if points < 1:
            continue
        status, ci = against_threshold(float(c["value"]), points, c["threshold"])
        c["ci95"], c["n"] = ci, points
        if c["status"] == "warn" and float(c["value"]) <= c["threshold"]:
            continue
        if status == "inconclusive":
            c["explanation"] = (f"inconclusive at n = {points}: the 95 % interval [{ci[0]}, "
                                f"{ci[1]}] {c['unit']} contains the threshold {c['threshold']} "
                                f"{c['unit']}; audit more images to decide")
        elif status == "warn" and c["status"] != "warn":
            c["explanation"] = f"interval [{ci[0]}, {ci[1]}] above the threshold"
        elif status == "pass" and c["status"] == "warn":
            c["explanation"] = f"ok: interval [{ci[0]}, {ci[1]}] at or below the threshold"
        c["status"] = status
    statuses = {c["status"] for c in checks}
    return "warn" if "warn" in statuses else "inconclusive" if "inconclusive" in statuses \
        else "pass"
