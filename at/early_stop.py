"""Early stopping on the validation PGD accuracy (train.early_stop), against robust overfitting
(Rice et al., "Overfitting in adversarially robust deep learning", ICML 2020): once the robust
accuracy has peaked, more epochs only cost time. best.pt is still the best validated epoch; this
only decides when to stop.

Every epoch record in metrics.jsonl gets an `early_stop` entry (the counter after that epoch), so
a resumed run continues the count from its own records, and final.json gets the outcome
(`state`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from errors import ConfigError

METRICS = ("val_robust_acc", "avg_val_robust_acc")


class EarlyStop:
    """observe(record) after each epoch's validation; True once `patience` validations in a row
    brought no new best of `metric` (a strict improvement). Epochs without validation (eval.every)
    do not count."""

    def __init__(self, metric: str = "val_robust_acc", patience: int = 0):
        self.metric, self.patience = metric, patience
        self.best, self.best_epoch, self.bad, self.stopped_epoch = -math.inf, 0, 0, None

    @classmethod
    def from_config(cls, cfg: dict) -> EarlyStop:
        """The train.early_stop section (checked when the config was loaded: check_config)."""
        es = cfg["train"]["early_stop"]
        return cls(es["metric"], es["patience"])

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    @property
    def stopped(self) -> bool:
        """Once stopped, a run stays stopped (a later record does not undo it)."""
        return self.enabled and self.stopped_epoch is not None

    def state(self) -> dict:
        return {"metric": self.metric, "patience": self.patience,
                "best": None if self.best == -math.inf else self.best,
                "best_epoch": self.best_epoch, "bad": self.bad,
                "stopped_epoch": self.stopped_epoch}

    def observe(self, record: dict) -> bool:
        """Count `record` (one epoch of metrics.jsonl) and note the counter in it."""
        if not self.enabled:
            return False
        value = record.get(self.metric)
        if value is not None and not self.stopped:
            if value > self.best:
                self.best, self.best_epoch, self.bad = value, record["epoch"], 0
            else:
                self.bad += 1
            if self.bad >= self.patience:
                self.stopped_epoch = record["epoch"]
        record["early_stop"] = self.state()
        return self.stopped

    def restore(self, metrics: Path, epoch: int) -> None:
        """Continue the count of a resumed run from its records up to `epoch` (the checkpoint's);
        the patience may have changed since (a whitelisted resume change)."""
        if not self.enabled or epoch == 0 or not metrics.is_file():
            return
        last = None
        for line in metrics.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("epoch", math.inf) <= epoch and \
                    (record.get("early_stop") or {}).get("metric") == self.metric:
                last = record
        if last is not None:
            saved = last["early_stop"]
            self.best = -math.inf if saved["best"] is None else saved["best"]
            self.best_epoch, self.bad = saved["best_epoch"], saved["bad"]
            if self.bad >= self.patience:  # under the patience now configured
                self.stopped_epoch = saved["stopped_epoch"] or last["epoch"]

    def message(self) -> str:
        return (f"at.train: early stop after epoch {self.stopped_epoch}: {self.metric} has not "
                f"improved for {self.bad} validation(s) since epoch {self.best_epoch} "
                f"({self.best:.2f})")


def check_config(cfg: dict) -> None:
    """The train.early_stop section, checked against the rest of the config."""
    es = cfg["train"]["early_stop"]
    metric, patience = es["metric"], es["patience"]
    if metric not in METRICS:
        raise ConfigError(f"train.early_stop.metric must be one of {', '.join(METRICS)}, "
                          f"got {metric!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ConfigError(f"train.early_stop.patience must be an integer >= 0 (0 = off), "
                          f"got {patience!r}")
    if patience > 0:
        if cfg["data"]["val_size"] == 0 or (cfg["data"]["val_size"] is None
                                            and cfg["data"]["name"] == "imagenet"):
            raise ConfigError("train.early_stop needs a validation split (data.val_size > 0)")
        if metric.startswith("avg_") and cfg["avg"]["kind"] == "none":
            raise ConfigError(f"train.early_stop.metric={metric} needs weight averaging "
                              f"(avg.kind)")
