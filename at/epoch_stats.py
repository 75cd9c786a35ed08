"""The running statistics of one training epoch, kept on the device so that a step never waits
for the GPU; the host reads them once per log interval and at the epoch's end."""
from __future__ import annotations

import torch
from torch import Tensor

from . import distributed


class EpochStats:
    """Sums over the epoch's images of the loss and its terms (batch mean x batch size), correct
    training predictions, and the first step whose loss was not finite (-1: none)."""

    def __init__(self, device: torch.device, sums: dict[str, float] | None = None,
                 seen: int = 0):
        """sums, seen: the statistics of a partly done epoch (a mid-epoch checkpoint)."""
        self.zero = torch.zeros((), device=device, dtype=torch.float64)
        self.sums: dict[str, Tensor] = {k: self.zero + v for k, v in (sums or {}).items()}
        self.seen = seen
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)

    def add(self, step: int, y: Tensor, loss: Tensor, out) -> None:
        """One optimisation step's batch: labels `y`, total loss, the method's StepOutput."""
        sums, zero, n = self.sums, self.zero, len(y)
        self.seen += n
        batch = {"loss": loss, **{f"loss_{k}": v for k, v in out.terms.items()}}
        for key, value in batch.items():
            sums[key] = sums.get(key, zero) + value.detach().double() * n
        for key, logits in (("train_adv_acc", out.logits_adv),
                            ("train_clean_acc", out.logits_clean)):
            if logits is not None:
                sums[key] = sums.get(key, zero) + (logits.argmax(1) == y).sum()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss),
                                     torch.full_like(self.first_bad, step), self.first_bad)

    def first_nonfinite_step(self) -> int:
        """The first step with a NaN/inf loss on any rank, or -1 (one host sync)."""
        return distributed.all_max(int(self.first_bad.item()))

    def mean_loss(self) -> float:
        return self.sums["loss"].item() / self.seen

    def host_sums(self) -> dict[str, float]:
        """This rank's sums as Python floats (a mid-epoch checkpoint)."""
        return {k: v.item() for k, v in self.sums.items()}

    def reduce(self) -> tuple[dict[str, float], float]:
        """({key: mean over all ranks' images, accuracies in percent}, images seen)."""
        keys = sorted(self.sums)
        totals = distributed.all_reduce_sum_(
            torch.stack([self.sums[k] for k in keys] + [self.zero + self.seen])).tolist()
        seen = totals[-1]
        return {k: v / seen * (100.0 if k.endswith("_acc") else 1.0)
                for k, v in zip(keys, totals)}, seen
