"""Device-resident batch iterators: the uint8 set lives on the device, batches become float there.

No DataLoader workers and no PIL: a CIFAR-sized uint8 set is 150 MB, so it is moved to the GPU
once and each batch is gathered, augmented and converted in a few kernels.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .augment import random_crop_flip, upload
from .autoaugment import cifar10_policy, cutout, random_rotate
from .generated import GeneratedSet

# The basic view: "crop_flip" = RandomCrop(32, padding=4) + horizontal flip (all reference runs);
# "crop_flip_rotate" adds RandomRotation(15) (DM-Improves-AT's CIFAR-100 "base"); "none".
AUGMENTATIONS = ("crop_flip", "crop_flip_rotate", "none")
# The optional second view of the same images (DKL `--aug autoaug` / `--aug cutout`):
# crop + flip + the CIFAR-10 AutoAugment policy, or crop + flip + Cutout(16).
SECOND_VIEWS = ("autoaugment", "cutout")


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    if x.dtype != torch.uint8:
        # Refusing floats avoids silently dividing already-scaled images by 255 a second time.
        raise TypeError(f"to_float expects uint8 images, got {x.dtype}")
    return x.float().div_(255)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (e.g. run seed, epoch, rank): independent streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


class TrainLoader:
    """Shuffled, augmented training batches (x float32 [0,1] B×3×32×32, y int64) on `device`.

    Real images only (generated=None): an epoch is one pass over a fresh permutation, in batches
    of `batch_size` (the last one smaller unless drop_last).

    With a generated set (Wang et al. 2023, docs/reference.md#generated-data): an epoch is
    ceil(epoch_size / batch_size) batches; each holds exactly
    batch_size - round(batch_size * fraction) real images, taken without replacement from a
    permutation that carries over from epoch to epoch (a new one when it runs out), and
    round(batch_size * fraction) generated images drawn uniformly with replacement. Generated
    images are read from disk by background threads while earlier batches train, into pinned
    memory, copied asynchronously and augmented on the device like real ones.

    Distributed (world_size > 1): every rank draws the same global batches and keeps its share of
    each: positions tensor_split(randperm(B), world_size)[rank] of the global batch, so ranks are
    disjoint, their union is the global batch, and the stream is the same for any world size
    (resume on another number of GPUs). `global_size` is the size of the global batch just
    yielded. A last real-only batch with fewer images than ranks is dropped.

    Randomness: the sampler `generator` draws the indices (its state, the permutation in use and
    the epoch are the state_dict); augmentation draws come from a second CPU generator seeded
    from (seed, epoch, rank), so between epochs no per-rank state is needed. state_dict() taken
    inside an epoch also holds the position and the augmentation generator (see there). With
    `second_view` each batch holds two views of its images: x = cat([basic, second]), y =
    cat([y, y]); `views` is then 2.
    """

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int, *,
                 generator: torch.Generator, augment: str = "crop_flip", drop_last: bool = False,
                 device: torch.device | str | None = None,
                 second_view: str | None = None, generated: GeneratedSet | None = None,
                 fraction: float = 0.7, epoch_size: int | None = None,
                 rank: int = 0, world_size: int = 1, prefetch: int = 3) -> None:
        if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
            raise TypeError(f"TrainLoader expects uint8 N×C×H×W images, got {x_uint8.dtype} "
                            f"{tuple(x_uint8.shape)}")
        if len(y) != len(x_uint8):
            raise ValueError(f"{len(x_uint8)} images but {len(y)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augment {augment!r}; valid: {', '.join(AUGMENTATIONS)}")
        if second_view is not None and second_view not in SECOND_VIEWS:
            raise ValueError(f"unknown second_view {second_view!r}; valid: None, "
                             f"{', '.join(SECOND_VIEWS)}")
        if generator.device.type != "cpu":
            raise ValueError(f"TrainLoader needs a CPU torch.Generator, got one on "
                             f"{generator.device}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} is smaller than the {world_size} ranks")
        self.device = torch.device(device) if device is not None else x_uint8.device
        self.x = x_uint8.to(self.device)  # stays uint8: 4× less device memory than float
        self.y = y.to(self.device, dtype=torch.int64)
        self.batch_size, self.generator = batch_size, generator
        self.seed = generator.initial_seed()
        self.augment, self.drop_last = augment, drop_last
        self.second_view = second_view
        self.views = 1 if second_view is None else 2
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.epoch = 0  # epochs started; the augmentation seed of epoch e is (seed, e, rank)
        self.global_size = 0
        self.generated = generated
        if generated is not None:
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"data.generated.fraction must be in [0, 1], got {fraction}")
            self.n_generated = round(batch_size * fraction)
            self.n_real = batch_size - self.n_generated
            if self.n_real > len(self.x):
                raise ValueError(f"{self.n_real} real images per batch but only {len(self.x)} "
                                 f"in the training set")
            self.epoch_size = len(self.x) if epoch_size is None else epoch_size
            if self.epoch_size < 1:
                raise ValueError(f"epoch_size must be >= 1, got {self.epoch_size}")
        # The real-image permutation in use and the position in it (generated mode only).
        self._perm: torch.Tensor | None = None
        self._pos = 0
        # Position inside the current epoch (batches handed out; 0 between epochs), what the
        # epoch was planned from, its augmentation generator, and a pending mid-epoch resume.
        self._step, self._resume_step = 0, 0
        self._epoch_start: tuple | None = None
        self._augmenter: torch.Generator | None = None

    def __len__(self) -> int:
        if self.generated is not None:
            return math.ceil(self.epoch_size / self.batch_size)
        n, b = len(self.x), self.batch_size
        if self.drop_last or n % b == 0 or n % b >= self.world_size:
            return n // b if self.drop_last else math.ceil(n / b)
        return n // b  # the last batch is too small to give every rank an image

    # ---- planning: every rank draws the same global batches --------------------------------
    def _plan(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(real indices, generated indices) of this rank's share of every batch of the epoch,
        drawn from the sampler in a fixed order: the same for every rank and world size."""
        g, b = self.generator, self.batch_size
        if self.generated is None:
            perm = torch.randperm(len(self.x), generator=g)
            empty = torch.empty(0, dtype=torch.int64)
            return [(self._share(perm[i * b:(i + 1) * b]), empty) for i in range(len(self))]
        steps = len(self)
        gen = torch.randint(len(self.generated), (steps, self.n_generated), generator=g)
        plan = []
        for step in range(steps):
            real = self._take_real(self.n_real)
            # Which positions of the global batch each rank gets: a random split, so that no rank
            # sees only real or only generated images.
            order = torch.randperm(b, generator=g)
            mine = self._share(order)
            plan.append((real[mine[mine < self.n_real]],
                         gen[step][mine[mine >= self.n_real] - self.n_real]))
        return plan

    def _share(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.tensor_split(positions, self.world_size)[self.rank]

    def _take_real(self, k: int) -> torch.Tensor:
        parts = []
        while k > 0:
            if self._perm is None or self._pos == len(self._perm):
                self._perm, self._pos = torch.randperm(len(self.x), generator=self.generator), 0
            take = min(k, len(self._perm) - self._pos)
            parts.append(self._perm[self._pos:self._pos + take])
            self._pos += take
            k -= take
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    # ---- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        first = self._resume_step  # > 0: continue an epoch a mid-epoch state_dict came from
        if first:
            augmenter = self._augmenter
        else:
            self.epoch += 1
            augmenter = torch.Generator().manual_seed(
                derived_seed(self.seed, self.epoch, self.rank))
        # What the epoch's plan is drawn from, so that a mid-epoch state can redraw it.
        self._epoch_start = (self.generator.get_state(), self._perm, self._pos)
        self._augmenter, self._resume_step = augmenter, 0
        plan = self._plan()
        global_sizes = self._global_sizes()
        pending: dict[int, object] = {}
        pin = self.device.type == "cuda"

        def fetch(step: int) -> None:
            if self.generated is not None and step < len(plan) and len(plan[step][1]):
                pending[step] = self.generated.gather(plan[step][1], pin=pin)

        try:
            for step in range(first, min(first + self.prefetch, len(plan))):
                fetch(step)
            for step in range(first, len(plan)):
                real, _ = plan[step]
                self._step = step + 1  # batches handed out this epoch, this one included
                fetch(step + self.prefetch)  # keeps `prefetch` batches in flight
                real = upload(real, self.device)
                xb, yb = self.x[real], self.y[real]
                if step in pending:
                    images, labels = pending.pop(step).wait()
                    images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
                    xb = torch.cat([xb, images])
                    yb = torch.cat([yb, labels.to(self.device, non_blocking=True)])
                self.global_size = global_sizes[step]
                basic = self._basic_view(xb, augmenter)
                if self.second_view is None:
                    yield to_float(basic), yb
                else:
                    yield (to_float(torch.cat([basic, self._second_view(xb, augmenter)])),
                           torch.cat([yb, yb]))
            self._step = 0  # the epoch is complete: state_dict is an epoch boundary again
        finally:
            for job in pending.values():
                job.cancel()

    def _global_sizes(self) -> list[int]:
        if self.generated is not None:
            return [self.batch_size] * len(self)
        n, b = len(self.x), self.batch_size
        return [min(b, n - i * b) for i in range(len(self))]

    def _basic_view(self, xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.augment == "none":
            return xb.contiguous()
        xb = random_crop_flip(xb, g)
        if self.augment == "crop_flip_rotate":
            xb = random_rotate(xb, g, degrees=15.0)
        return xb

    def _second_view(self, xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        xb = random_crop_flip(xb, g)
        if self.second_view == "autoaugment":
            return cifar10_policy(xb, g)
        return cutout(xb, g, length=16)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands. Between epochs: the sampler state, epoch and real-image
        permutation. Inside an epoch (after `step` of its batches were handed out): the state
        the epoch's plan was drawn from, `step`, and this rank's augmentation generator, so that
        loading it continues with batch step + 1 exactly. Under torchrun each rank's state
        differs only in `augmenter`."""
        if self._step:
            generator, perm, pos = self._epoch_start
            return {"generator": generator, "seed": self.seed, "epoch": self.epoch,
                    "perm": perm, "pos": pos, "step": self._step,
                    "augmenter": self._augmenter.get_state()}
        return {"generator": self.generator.get_state(), "seed": self.seed, "epoch": self.epoch,
                "perm": self._perm, "pos": self._pos, "step": 0}

    def load_state_dict(self, state: dict[str, Any], augmenter: torch.Tensor | None = None
                        ) -> None:
        """`augmenter`: this rank's augmentation-generator state for a mid-epoch state taken on
        another rank (None: the state's own; when the world size changed, pass a fresh seed's
        state: the augmentation then differs from an uninterrupted run, nothing else)."""
        self.generator.set_state(state["generator"])
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._perm, self._pos = state["perm"], int(state["pos"])
        self._resume_step = int(state.get("step", 0))
        self._step = 0
        if self._resume_step:
            self._augmenter = torch.Generator()
            self._augmenter.set_state(state["augmenter"] if augmenter is None else augmenter)


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
                    device: torch.device | str | None = None,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-order, unaugmented (x float32, y int64) batches on `device`, for evaluation loops.

    x may be uint8 (scaled to [0, 1]) or float (taken as already in [0, 1]).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
        yield xb, y[start:start + batch_size].to(device, dtype=torch.int64)


class TensorEvalSet:
    """An evaluation split held as tensors (uint8 or float images, int64 labels), with
    FolderEvalSet's interface."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, device: torch.device | str | None = None,
                rows: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x float32 [0,1], y int64) on `device` for `rows` (default all), in order."""
        x, y = (self.x, self.y) if rows is None else (self.x[rows], self.y[rows])
        return iterate_batches(x, y, batch_size, device)
