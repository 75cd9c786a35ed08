"""Clean and PGD (cross-entropy or CW margin) accuracy on tensors or a stream of batches, in eval
mode; and the training run's validation and final test accuracy (`Evaluator`)."""
from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks import frozen, pgd
from data import to_float

from . import distributed


def _images(x: Tensor) -> Tensor:
    """float32 images in [0, 1] from uint8 (data.to_float) or from floats already scaled."""
    return to_float(x) if x.dtype == torch.uint8 else x.float()


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example margin max_{i != y} z_i - z_y (Carlini & Wagner); positive = misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


ATTACK_LOSSES = {
    "ce": lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
    "cw": cw_margin,
}


def correct(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256,
            **kwargs) -> Tensor:
    """Per-example correctness (bool, on the CPU) on tensors: `x` may be uint8 (0..255) or float
    in [0,1], on any device. Keyword arguments as for `correct_batches`."""
    device = next(model.parameters()).device
    batches = ((_images(x[s:s + batch_size].to(device, non_blocking=True)),
                y[s:s + batch_size].to(device, non_blocking=True))
               for s in range(0, len(x), batch_size))
    return correct_batches(model, batches, **kwargs)


def correct_batches(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                    eps: float = 0.0, steps: int = 0, step_size: float = 0.0,
                    norm: str = "linf", loss: str = "ce", seed: int = 0) -> Tensor:
    """Per-example correctness (bool, on the CPU) over (x float [0,1], y) batches on the model's
    device. With steps > 0: under PGD-`steps` maximising `loss` ("ce" or "cw") from a uniform
    random start, seeded by `seed` so every call attacks identically."""
    objective = ATTACK_LOSSES[loss]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    flags = []
    with frozen(model):
        for xb, yb in batches:
            if steps > 0:
                xb = pgd(lambda z: objective(model(z), yb), xb, eps=eps, step_size=step_size,
                         steps=steps, norm=norm, init="uniform", generator=generator)
            with torch.no_grad():
                flags.append(model(xb).argmax(dim=1) == yb)
    # One transfer at the end: no host synchronisation per batch.
    return torch.cat(flags).cpu() if flags else torch.zeros(0, dtype=torch.bool)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, **kwargs) -> float:
    """Top-1 accuracy in percent (NaN for an empty set); keyword arguments as for `correct`."""
    flags = correct(model, x, y, **kwargs)
    return 100.0 * flags.double().mean().item() if len(flags) else float("nan")


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
        ecfg, result = self.ecfg, {}
        test = self.eval_sets["test"]
        for name, epoch, model in candidates:
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
