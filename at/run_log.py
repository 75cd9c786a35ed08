"""Per-epoch records of a run: metrics.jsonl, curves.png and (optionally) Weights & Biases."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from errors import RunError

from .checkpoint import atomic_write

ACCURACY_KEYS = ("train_adv_acc", "train_clean_acc", "val_clean_acc", "val_robust_acc",
                 "test_clean_acc", "avg_val_clean_acc", "avg_val_robust_acc", "avg_test_clean_acc")


class RunLog:
    def __init__(self, out_dir: Path, cfg: dict, *, resume_epoch: int = 0):
        self.path = out_dir / "metrics.jsonl"
        self.plot_path = out_dir / "curves.png" if cfg["log"]["plot"] else None
        self.best_on = cfg["eval"]["best_on"]
        self.records = [r for r in self._read() if r["epoch"] <= resume_epoch]
        # Lines written after the checkpoint we resume from describe epochs that will be redone.
        self._rewrite()
        self.wandb = _init_wandb(out_dir, cfg) if cfg["log"]["wandb"] else None

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def _rewrite(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.path, lambda f: f.write(text.encode()))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.plot_path is not None:
            plot_curves(self.records, self.plot_path, self.best_on)
        if self.wandb is not None:
            self.wandb.log(record, step=record["epoch"])

    def event(self, record: dict) -> None:
        """A line that is not an epoch record (it has an "event" key: at/co_guard.py); curves
        and wandb leave it out."""
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def require_wandb():
    try:
        import wandb
    except ImportError:
        raise RunError("log.wandb=true but wandb is not installed (pip install wandb)") from None
    return wandb


def _init_wandb(out_dir: Path, cfg: dict):
    wandb = require_wandb()
    # Offline unless the user asked otherwise: training must not depend on the network.
    mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(project=cfg["log"]["wandb_project"], dir=str(out_dir), config=cfg,
                      name=out_dir.name, mode=mode)


def best_epoch(records: list[dict], best_on: str = "model") -> int | None:
    """The epoch best.pt holds: the first with the highest validation PGD accuracy of the
    weights eval.best_on names (the trainer's rule); None before any validation."""
    key = "avg_val_robust_acc" if best_on == "avg" else "val_robust_acc"
    best, epoch = -math.inf, None
    for r in records:
        if r.get(key) is not None and r[key] > best:
            best, epoch = r[key], r["epoch"]
    return epoch


def curves_figure(records: list[dict], best_on: str = "model"):
    """Accuracies (left) and loss terms (right) against the epoch, whole-epoch ticks, a dashed
    line at the best epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = [r for r in records if "event" not in r]  # co_guard events (RunLog.event)
    epochs = [r["epoch"] for r in records]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ACCURACY_KEYS:
        if any(r.get(key) is not None for r in records):
            ax_acc.plot(epochs, [r.get(key) for r in records], marker=".", label=key)
    for key in sorted({k for r in records for k in r if k.startswith("loss")}):
        ax_loss.plot(epochs, [r.get(key) for r in records], marker=".", label=key)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss terms")
    best = best_epoch(records, best_on)
    for ax in (ax_acc, ax_loss):
        if best is not None:
            ax.axvline(best, color="0.4", linestyle="--", linewidth=1,
                       label=f"best.pt (epoch {best})")
        # Epochs are whole numbers: no 1.2, 1.4, ... ticks on a short run.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(records: list[dict], path: Path, best_on: str = "model") -> None:
    """curves_figure, written atomically to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(records, best_on)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _fmt(value) -> str:
    return "   -  " if value is None else f"{value:6.2f}"


def epoch_line(r: dict, epochs: int) -> str:
    """One epoch's metrics record as the line at.train prints."""
    losses = " ".join(f"{k[5:] or 'total'} {v:.4f}" for k, v in r.items() if k.startswith("loss"))
    train_acc = r.get("train_adv_acc", r.get("train_clean_acc"))
    return (f"epoch {r['epoch']:>3}/{epochs}  lr {r['lr']:.4f}  eps {r['eps'] * 255:.2f}/255 "
            f"x{r['attack_steps']}  {losses}  train {'adv' if 'train_adv_acc' in r else 'clean'} "
            f"{_fmt(train_acc)}  val clean "
            f"{_fmt(r.get('val_clean_acc'))} pgd {_fmt(r.get('val_robust_acc'))}  test clean "
            f"{_fmt(r.get('test_clean_acc'))}  {r['train_seconds']:.0f}s+{r['eval_seconds']:.0f}s")


def final_table(result: dict, cfg: dict) -> str:
    """final.json's rows as the table at.train prints at the end."""
    steps = cfg["eval"]["pgd_steps"]
    eps = cfg["attack"]["eps"] * 255
    lines = [f"final test accuracy (%), PGD-{steps} at eps {eps:.4g}/255 ({cfg['attack']['norm']})",
             f"{'weights':<10}{'epoch':>6}{'clean':>9}{'PGD':>9}"]
    for name, row in result.items():
        lines.append(f"{name:<10}{row['epoch']:>6}{_fmt(row['test_clean_acc']):>9}"
                     f"{_fmt(row.get('test_robust_acc')):>9}")
    return "\n".join(lines)
