"""What a training run reads, built from the config's `data` section for either kind of dataset:
tensor datasets (CIFAR, digits: uint8 images in memory, augmented on the device) and image-file
datasets (ImageNet, ImageNet-LT: file lists decoded by DataLoader workers). The trainer sees only
the result, never a dataset name."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .folder import FolderEvalSet, FolderSplits, FolderTrainLoader, load_folder_splits
from .generated import GeneratedSet
from .loader import TensorEvalSet, TrainLoader

# Long-tailed training sets: final.json then also reports many / medium / few-shot accuracy.
LONG_TAILED = ("imagenet_lt",)


@dataclass
class TrainingData:
    """loader: this rank's training batches; eval_sets: {"val": None when there is no validation
    split, "test"} (TensorEvalSet / FolderEvalSet); class_counts: training images per class
    (int64, length num_classes) of a long-tailed set, else None; splits: the data.Splits tensors
    or data.FolderSplits file lists behind them."""
    loader: TrainLoader | FolderTrainLoader
    eval_sets: dict
    num_classes: int
    class_counts: torch.Tensor | None
    splits: object


def build_training_data(cfg: dict, device: torch.device, rank: int = 0, world_size: int = 1,
                        splits=None) -> TrainingData:
    """The training loader and evaluation sets of `cfg` (the whole resolved config: data, optim
    batch size, seed). `splits`: tensor data.Splits to train on instead of loading data.name
    (benchmarks)."""
    from . import FOLDER_DATASETS, NUM_CLASSES, load_splits  # the package's registry

    dcfg = cfg["data"]
    sampler = torch.Generator().manual_seed(cfg["seed"])
    common = dict(generator=sampler, drop_last=dcfg["drop_last"], device=device, rank=rank,
                  world_size=world_size)
    if splits is None and dcfg["name"] in FOLDER_DATASETS:
        files: FolderSplits = load_folder_splits(
            dcfg["name"], dcfg["root"], dcfg["lists"], dcfg["val_size"],
            dcfg["num_classes"] or NUM_CLASSES[dcfg["name"]])
        sizes = dict(image_size=dcfg["image_size"], resize_size=dcfg["resize_size"])
        loader = FolderTrainLoader(files.train, cfg["optim"]["batch_size"], augment=dcfg["augment"],
                                   workers=dcfg["workers"], **sizes, **common)
        eval_sets = {name: None if part is None else
                     FolderEvalSet(part, workers=dcfg["workers"], **sizes)
                     for name, part in (("val", files.val), ("test", files.test))}
        counts = torch.bincount(files.train.labels, minlength=files.num_classes) \
            if dcfg["name"] in LONG_TAILED else None
        return TrainingData(loader, eval_sets, files.num_classes, counts, files)
    splits = splits or load_splits(dcfg["name"], root=dcfg["root"], val_size=dcfg["val_size"],
                                   download=dcfg["download"])
    gcfg = dcfg["generated"]
    generated = GeneratedSet(gcfg["path"], splits.num_classes) if gcfg["path"] else None
    loader = TrainLoader(
        splits.train_x, splits.train_y, cfg["optim"]["batch_size"], augment=dcfg["augment"],
        second_view=dcfg["second_view"], generated=generated, fraction=gcfg["fraction"],
        # An epoch with generated data: as many batches as the official training set fills
        # (50,000 CIFAR images, validation included), as Wang et al.
        epoch_size=len(splits.train_y) + len(splits.val_y), **common)
    eval_sets = {
        "val": TensorEvalSet(splits.val_x, splits.val_y) if len(splits.val_y) else None,
        "test": TensorEvalSet(splits.test_x, splits.test_y)}
    return TrainingData(loader, eval_sets, splits.num_classes, None, splits)
