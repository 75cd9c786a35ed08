"""Device-resident batch iterators: the uint8 set lives on the device, batches become float there.

No DataLoader workers and no PIL: a CIFAR-sized uint8 set is 150 MB, so it is moved to the GPU
once and each batch is gathered, augmented and converted in a few kernels.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from .augment import random_crop_flip
from .autoaugment import cifar10_policy, cutout, random_rotate

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


class TrainLoader:
    """Shuffled, augmented training batches (x float32 [0,1] B×3×32×32, y int64) on `device`.

    With `second_view` set, each batch holds two views of the same B images: x = cat([basic view,
    second view]) (2B images) and y = cat([y, y]); `views` is then 2 (else 1). Per batch the basic
    view draws its random numbers first, then the second view (its own crop + flip, then the policy
    or the hole), so only the first batch's basic half equals a single-view loader's.

    All randomness (the per-epoch permutation and the augmentation) comes from one CPU generator,
    so state_dict()/load_state_dict() taken at an epoch boundary resume a run exactly.
    """

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int, *,
                 generator: torch.Generator, augment: str = "crop_flip", drop_last: bool = False,
                 device: torch.device | str | None = None,
                 second_view: str | None = None) -> None:
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
        self.device = torch.device(device) if device is not None else x_uint8.device
        self.x = x_uint8.to(self.device)  # stays uint8: 4× less device memory than float
        self.y = y.to(self.device, dtype=torch.int64)
        self.batch_size, self.generator = batch_size, generator
        self.augment, self.drop_last = augment, drop_last
        self.second_view = second_view
        self.views = 1 if second_view is None else 2

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Drawn on the CPU so the order does not depend on the device.
        perm = torch.randperm(len(self.x), generator=self.generator).to(self.device)
        for b in range(len(self)):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            basic = self._basic_view(xb)
            if self.second_view is None:
                yield to_float(basic), yb
            else:
                yield to_float(torch.cat([basic, self._second_view(xb)])), torch.cat([yb, yb])

    def _basic_view(self, xb: torch.Tensor) -> torch.Tensor:
        if self.augment == "none":
            return xb
        xb = random_crop_flip(xb, self.generator)
        if self.augment == "crop_flip_rotate":
            xb = random_rotate(xb, self.generator, degrees=15.0)
        return xb

    def _second_view(self, xb: torch.Tensor) -> torch.Tensor:
        xb = random_crop_flip(xb, self.generator)
        if self.second_view == "autoaugment":
            return cifar10_policy(xb, self.generator)
        return cutout(xb, self.generator, length=16)

    def state_dict(self) -> dict[str, Any]:
        """Generator state; take it between epochs (a partly consumed epoch has used some draws)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


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
