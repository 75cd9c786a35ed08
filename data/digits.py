"""UCI handwritten digits (the copy bundled with scikit-learn) shaped like CIFAR, for CPU demos.

1,797 greyscale 8×8 images (0..16) become uint8 3×32×32 by bilinear upsampling, so they take the
same uint8 path as CIFAR. A fixed seeded split holds out 360 test images; the other 1,437 are
"train" (load_splits takes its validation images from the front of those).
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_TEST_SIZE = 360
DIGITS_VAL_SIZE = 200  # default validation size: the first 200 "train" images (after the shuffle)
_SPLIT_SEED = 0


def load_digits(split: str = "train", root: str = "data",
                download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(x uint8 N×3×32×32, y int64 N) for split "train" (1,437 images) or "test" (360).

    root and download are ignored (the data ship with scikit-learn); they are accepted so that all
    dataset loaders share one signature.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} for digits; valid splits: train, test")
    x, y = _all_digits()
    train_idx, test_idx = split_indices()
    idx = train_idx if split == "train" else test_idx
    return x[idx], y[idx]


def split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into scikit-learn's order of the 1,437 "train" and the 360 "test" images."""
    # numpy's legacy RandomState stream is frozen across versions, so the split never changes;
    # torch.randperm makes no such promise.
    perm = torch.from_numpy(np.random.RandomState(_SPLIT_SEED).permutation(1797))
    return perm[DIGITS_TEST_SIZE:], perm[:DIGITS_TEST_SIZE]


def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, target = _sklearn_digits()
    x = torch.tensor(images).div(16).unsqueeze(1)  # N×1×8×8 in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.tensor(target)


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 1797×8×8 in 0..16, target int64 1797), read-only (torch.tensor copies
    them), as sklearn.datasets.load_digits gives them."""
    # The CSV scikit-learn ships, read directly: importing sklearn.datasets takes about a second,
    # paid by every training and evaluation process on the digits. Its API is the fallback.
    csv = _bundled_csv()
    if csv is not None:
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        images, target = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    images.flags.writeable = target.flags.writeable = False
    return images, target


def _bundled_csv() -> Path | None:
    """scikit-learn's digits.csv.gz (found without importing scikit-learn), or None."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None
