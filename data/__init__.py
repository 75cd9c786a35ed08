"""Datasets by name. Tensor datasets (CIFAR-10, CIFAR-100, the small UCI digits set) are uint8
N×3×32×32 tensors; image-file datasets (ImageNet, ImageNet-LT) are file lists read by workers
(data/folder.py).

load_splits() gives the train/val/test split used for training (val = the first `val_size` training
images); load_dataset() gives one float split for notebooks and evaluation.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from errors import ConfigError, unknown

from .augment import crop_flip, crop_flip_params, random_crop_flip
from .autoaugment import cifar10_policy, cutout, random_rotate
from .cifar import load_cifar10, load_cifar100
from .digits import DIGITS_VAL_SIZE, load_digits
from .folder import (
    FOLDER_AUGMENTATIONS,
    FileList,
    FolderEvalSet,
    FolderSplits,
    FolderTrainLoader,
    load_folder_splits,
)
from .generated import GeneratedSet
from .loader import (
    AUGMENTATIONS,
    SECOND_VIEWS,
    TensorEvalSet,
    TrainLoader,
    derived_seed,
    iterate_batches,
    to_float,
)

# name -> loader(split in {"train", "test"}, root, download) -> (x uint8 N×3×32×32, y int64 N).
DATASETS: dict[str, Callable[[str, str, bool], tuple[torch.Tensor, torch.Tensor]]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "digits": load_digits,
}
# Image-file datasets: read from data.root by DataLoader workers, not held in memory.
FOLDER_DATASETS = ("imagenet", "imagenet_lt")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10, "imagenet": 1000,
               "imagenet_lt": 1000}
# Validation size when the caller gives none: Wang et al. (2023) hold out the first 1024 CIFAR
# training images; the digits set has only 1,437 training images, so it keeps 200.
DEFAULT_VAL_SIZE = {"cifar10": 1024, "cifar100": 1024, "digits": DIGITS_VAL_SIZE}


@dataclass
class Splits:
    """uint8 N×3×32×32 images and int64 labels, on the CPU; val may be empty (val_size=0)."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str


def load_splits(name: str, root: str = "data", val_size: int | None = None,
                download: bool = True) -> Splits:
    """Train/val/test: val is the FIRST val_size training images, train the rest.

    val_size=None uses DEFAULT_VAL_SIZE[name] (1024 for CIFAR, 200 for digits).
    """
    loader = DATASETS[_check_name(name)]
    val_size = DEFAULT_VAL_SIZE[name] if val_size is None else val_size
    x, y = loader("train", root, download)
    if not 0 <= val_size < len(x):
        raise ConfigError(f"val_size must satisfy 0 <= val_size < {len(x)} (the {name} training "
                         f"set), got {val_size}")
    test_x, test_y = loader("test", root, download)
    return Splits(x[val_size:], y[val_size:], x[:val_size], y[:val_size], test_x, test_y,
                  NUM_CLASSES[name], name)


def load_dataset(name: str, split: str = "test", root: str = "data",
                 n_examples: int | None = None,
                 download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (x float32 N×3×32×32 in [0, 1], y int64 N); n_examples keeps the FIRST n.

    split: "train" (the full official training set, validation images included) or "test"; digits
    also has "val", the first DIGITS_VAL_SIZE (200) of its "train" images, as load_splits makes it.
    """
    loader = DATASETS[_check_name(name)]
    valid = ("train", "val", "test") if name == "digits" else ("train", "test")
    if split not in valid:
        raise ConfigError(f"unknown split {split!r} for {name}; valid splits: {', '.join(valid)}")
    x, y = loader("test" if split == "test" else "train", root, download)
    if split == "val":
        x, y = x[:DEFAULT_VAL_SIZE[name]], y[:DEFAULT_VAL_SIZE[name]]
    if n_examples is not None:
        if not 1 <= n_examples <= len(x):
            # Refused rather than clipped: a silently smaller evaluation set misreports results.
            raise ConfigError(f"n_examples must be in [1, {len(x)}] for {name} {split}, "
                             f"got {n_examples}")
        x, y = x[:n_examples], y[:n_examples]
    return to_float(x), y


def _check_name(name: str) -> str:
    if name in FOLDER_DATASETS:
        raise ConfigError(f"{name} is an image-file dataset, not loaded into memory: its splits "
                         f"come from load_folder_splits and are evaluated by at.train")
    if name not in DATASETS:
        raise unknown("dataset", name, [*DATASETS, *FOLDER_DATASETS], listed="valid names")
    return name


__all__ = [
    "AUGMENTATIONS", "DATASETS", "DEFAULT_VAL_SIZE", "FOLDER_AUGMENTATIONS", "FOLDER_DATASETS",
    "FileList", "FolderEvalSet", "FolderSplits", "FolderTrainLoader",
    "GeneratedSet", "NUM_CLASSES", "SECOND_VIEWS", "Splits",
    "TensorEvalSet", "TrainLoader", "cifar10_policy", "crop_flip", "load_folder_splits",
    "crop_flip_params", "cutout", "derived_seed", "iterate_batches", "load_dataset", "load_splits",
    "random_crop_flip", "random_rotate", "to_float",
]
