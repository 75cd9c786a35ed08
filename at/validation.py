"""A training run's accuracy measurements (`Evaluator`): per-epoch validation, which selects
best.pt, and the final test accuracy of the last / best / averaged weights, with per-shot-group
accuracy for long-tailed sets."""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from attacks.accuracy import correct_batches

from . import distributed

# Long-tailed benchmarks (Liu et al., CVPR 2019): a class is many-shot with more than 100
# training images, medium-shot with 20 to 100, few-shot with fewer than 20.
SHOT_GROUPS = (("many", 101, None), ("medium", 20, 100), ("few", 0, 19))


def shot_accuracies(hits: Tensor, counts: Tensor, train_counts: Tensor) -> dict[str, float]:
    """Accuracy (percent) of each shot group: the mean over the group's classes of their test
    accuracy hits[c] / counts[c] (as the long-tail references report it; classes without test
    images are left out). hits, counts, train_counts: per class, length C."""
    out = {}
    for name, low, high in SHOT_GROUPS:
        member = (train_counts >= low) & (counts > 0)
        if high is not None:
            member &= train_counts <= high
        per_class = hits[member].double() / counts[member].double()
        out[f"{name}_shot"] = 100.0 * per_class.mean().item() if member.any() else float("nan")
    return out


class Evaluator:
    """A training run's accuracy measurements: per-epoch validation (checkpoint selection), the
    per-epoch test clean accuracy, and the final test accuracy of the last / best / averaged
    weights. With several ranks each evaluates a contiguous shard and the counts are summed."""

    def __init__(self, cfg: dict, eval_sets: dict, num_classes: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, class_counts: Tensor | None = None):
        """eval_sets: {"val": None or an evaluation set, "test": ...} (data.TensorEvalSet /
        FolderEvalSet); class_counts: training images per class of a long-tailed set."""
        ecfg, acfg = cfg["eval"], cfg["attack"]
        self.ecfg, self.eval_sets, self.num_classes = ecfg, eval_sets, num_classes
        self.device, self.rank, self.world, self.class_counts = device, rank, world_size, \
            class_counts
        # Validation and final PGD: cross-entropy, eval-mode BatchNorm, at the training radius.
        self.pgd = dict(eps=acfg["eps"], steps=ecfg["pgd_steps"], step_size=ecfg["pgd_step_size"],
                        norm=acfg["norm"], seed=cfg["seed"])

    def validate(self, model: nn.Module, epoch: int, final: bool) -> dict:
        """val clean / PGD accuracy every eval.every epochs (and at the last), test clean
        accuracy on the first eval.n_test images."""
        ecfg = self.ecfg
        start = time.time()
        record: dict = {}
        val, test = self.eval_sets["val"], self.eval_sets["test"]
        if val is not None and (final or epoch % ecfg["every"] == 0):
            record["val_clean_acc"] = self.accuracy(val, model)
            # PGD-0 is the clean accuracy: no second pass (an ImageNet validation set is large).
            record["val_robust_acc"] = (self.accuracy(val, model, **self.pgd)
                                        if ecfg["pgd_steps"] > 0 else record["val_clean_acc"])
        record["test_clean_acc"] = self.accuracy(test, model, n=ecfg["n_test"])
        record["eval_seconds"] = time.time() - start
        return record

    def final(self, candidates: list[tuple[str, int, nn.Module]]) -> dict:
        """{name: {epoch, test_clean_acc[, shot accuracies][, test_robust_acc and what it
        means]}} for (name, epoch, model) candidates, on the whole test set."""
        ecfg, result, done = self.ecfg, {}, []
        test = self.eval_sets["test"]
        for name, epoch, model in candidates:
            # The best epoch is often the last: the same weights are not attacked twice (the
            # seeded PGD would give the same numbers).
            same = next((row for other, row in done if _same_weights(model, other)), None)
            if same is not None:
                result[name] = {**same, "epoch": epoch}
                continue
            hits, counts = self.class_hits(test, model)
            total = counts.sum().item()
            row = {"epoch": epoch,
                   "test_clean_acc": 100.0 * hits.sum().item() / total if total else math.nan}
            if self.class_counts is not None:  # a long-tailed training set: accuracy per shot
                row.update({f"test_{k}_acc": v for k, v in
                            shot_accuracies(hits, counts, self.class_counts).items()})
            if ecfg["final_pgd"]:
                row["test_robust_acc"] = self.accuracy(test, model, **self.pgd)
                # What the number means, for readers of final.json alone (eval.summary).
                row.update(pgd_steps=ecfg["pgd_steps"], eps=self.pgd["eps"],
                           norm=self.pgd["norm"], n_test=int(total))
            result[name] = row
            done.append((model, row))
        return result

    def accuracy(self, dataset, model: nn.Module, n: int | None = None, **pgd_args) -> float:
        """Accuracy in percent on the first `n` images (all when None) of an evaluation set."""
        hits, counts = self.class_hits(dataset, model, n, **pgd_args)
        total = counts.sum().item()
        return 100.0 * hits.sum().item() / total if total else float("nan")

    def class_hits(self, dataset, model: nn.Module, n: int | None = None,
                   **pgd_args) -> tuple[Tensor, Tensor]:
        """Per class: correct predictions and images (float64, length C), summed over ranks."""
        n = len(dataset) if n is None else min(n, len(dataset))
        rows = None
        if self.world > 1 or n < len(dataset):
            rows = torch.tensor_split(torch.arange(n), self.world)[self.rank]
        labels = []

        def tap(batches):
            for xb, yb in batches:
                labels.append(yb)
                yield xb, yb

        flags = correct_batches(
            model, tap(dataset.batches(self.ecfg["batch_size"], self.device, rows)), **pgd_args)
        y = torch.cat(labels).cpu() if labels else torch.zeros(0, dtype=torch.int64)
        table = torch.zeros(2, self.num_classes, dtype=torch.float64)
        table[0].index_add_(0, y, flags.double())
        table[1].index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
        table = distributed.all_reduce_sum_(table.to(self.device)).cpu()
        return table[0], table[1]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Equal state_dicts: the same keys, and tensors of equal shape and values."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)
