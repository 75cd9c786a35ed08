"""Image-file datasets (ImageNet, ImageNet-LT): read, decoded and augmented by DataLoader workers.

On-disk layouts (the ones torchvision and the KD / long-tail code bases read):
* imagenet: ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG (the validation images sorted
  into class folders, as the usual valprep script does). Labels are the sorted class-folder
  names' positions, identical for train and val. The official validation set is the test split.
* imagenet_lt: the ImageNet files, chosen by the published split lists ImageNet_LT_train.txt /
  ImageNet_LT_val.txt / ImageNet_LT_test.txt (Liu et al., CVPR 2019; lines "relative/path label",
  relative to ROOT), read from data.lists (default: ROOT).

Images stay uint8 until they reach the device (a quarter of the bytes of float32 through the
pinned-memory copy); the models normalize inside, as the CIFAR ones do.

Augmentation is keyed by position: the random draws of the image at position p of epoch e come
from the seed (run seed, e, p), whatever the number of workers or ranks. A run resumed inside an
epoch, on any number of GPUs, therefore sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from errors import DataError

from .loader import to_float

FOLDER_AUGMENTATIONS = ("resized_crop_flip", "none")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm")
LT_LISTS = {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt",
            "test": "ImageNet_LT_test.txt"}
# RandomResizedCrop's area and aspect-ratio ranges (Szegedy et al. 2015; torchvision defaults).
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)



@dataclass
class FileList:
    """Image files (absolute paths) and their int64 labels."""
    paths: list[str]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: torch.Tensor) -> FileList:
        return FileList([self.paths[i] for i in rows.tolist()], self.labels[rows])


@dataclass
class FolderSplits:
    """train / val (None: no validation) / test file lists of an image-file dataset."""
    train: FileList
    val: FileList | None
    test: FileList
    num_classes: int
    name: str


def scan_folder(directory: Path, classes: list[str] | None = None) -> tuple[FileList, list[str]]:
    """An ImageFolder directory (one sub-directory per class) in sorted order; `classes` (from
    the training folder) must match its sub-directories when given."""
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory (expected one folder per class)")
    found = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"{directory} has no class folders")
    if classes is not None and found != classes:
        missing = sorted(set(classes) - set(found))[:3]
        extra = sorted(set(found) - set(classes))[:3]
        raise DataError(f"{directory} has other class folders than the training set "
                              f"(missing {missing}, extra {extra}); sort the validation images "
                              f"into the training set's class folders")
    paths, labels = [], []
    for label, name in enumerate(found):
        files = sorted(str(p) for p in (directory / name).iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{directory} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return FileList(paths, torch.tensor(labels, dtype=torch.int64)), found


def read_split_list(path: Path, root: Path, num_classes: int) -> FileList:
    """A split list ("relative/path label" per line, relative to `root`)."""
    if not path.is_file():
        raise DataError(f"split list {path} not found (data.lists: the directory holding "
                              f"{', '.join(LT_LISTS.values())})")
    paths, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected 'relative/path label', got "
                                  f"{line.strip()!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise DataError(f"{path}:{number}: label {label} outside [0, {num_classes})")
        paths.append(str(root / parts[0]))
        labels.append(label)
    if not paths:
        raise DataError(f"split list {path} is empty")
    # Stat'ing a million files on a network file system takes minutes: the first and last
    # are checked here (a wrong data.root), a missing one later is an error naming it.
    for p in {paths[0], paths[-1]}:
        if not Path(p).is_file():
            raise DataError(f"{p} (listed in {path}) does not exist; is data.root the "
                                  f"ImageNet directory the list is relative to?")
    return FileList(paths, torch.tensor(labels, dtype=torch.int64))


def load_folder_splits(name: str, root: str, lists: str | None, val_size: int | None,
                       num_classes: int) -> FolderSplits:
    """The splits of `name` (imagenet | imagenet_lt).

    imagenet: val_size None or 0 = no validation split; val_size = n > 0 holds out n training
    images chosen by a fixed permutation (seed 0: the same for every run seed). imagenet_lt:
    val_size None = the official validation list (20,000 images), 0 = none.
    """
    base = Path(root)
    if name == "imagenet":
        train, classes = scan_folder(base / "train")
        if len(classes) != num_classes:
            raise DataError(f"{base / 'train'} has {len(classes)} class folders, "
                                  f"{name} has {num_classes}")
        test, _ = scan_folder(base / "val", classes)
        val = None
        if val_size:
            if not 0 < val_size < len(train):
                raise DataError(f"data.val_size must be in [0, {len(train)}), got "
                                      f"{val_size}")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
            val = train.subset(order[:val_size].sort().values)
            train = train.subset(order[val_size:].sort().values)
        return FolderSplits(train, val, test, num_classes, name)
    if name == "imagenet_lt":
        where = Path(lists) if lists else base
        if val_size not in (None, 0):
            raise DataError(f"data.val_size for {name} must be null (the official "
                                  f"validation list) or 0 (none), got {val_size}")
        split = {k: read_split_list(where / f, base, num_classes) for k, f in LT_LISTS.items()
                 if k != "val" or val_size is None}
        return FolderSplits(split["train"], split.get("val"), split["test"], num_classes, name)
    raise DataError(f"{name} is not an image-file dataset")


# ---- decoding and augmentation (run in the DataLoader workers) ----------------------------------
def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def resized_crop_box(width: int, height: int, rng: np.random.Generator
                     ) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h): area fraction U(0.08, 1), log-uniform aspect
    ratio in [3/4, 4/3], ten tries, then the central crop of the clamped aspect ratio."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _to_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def train_view(img: Image.Image, size: int, rng: np.random.Generator) -> torch.Tensor:
    """RandomResizedCrop(size) (bilinear, antialiased as PIL resizes) + horizontal flip p=0.5."""
    left, top, w, h = resized_crop_box(img.width, img.height, rng)
    # Crop, then resize (as torchvision does; PIL's resize(box=...) would also read the pixels
    # just outside the box).
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_uint8(out)


def eval_view(img: Image.Image, size: int, resize: int) -> torch.Tensor:
    """Resize(resize) of the shorter side, then CenterCrop(size): the standard evaluation view."""
    w, h = img.size
    if w <= h:
        new = (resize, int(resize * h / w))
    else:
        new = (int(resize * w / h), resize)
    img = img.resize(new, Image.BILINEAR)
    if min(new) < size:
        raise DataError(f"data.resize_size {resize} is smaller than data.image_size {size}")
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return _to_uint8(img.crop((left, top, left + size, top + size)))


class FolderDataset(torch.utils.data.Dataset):
    """Map-style: key (row, aug_seed) -> (uint8 3 x size x size, label). aug_seed None (or
    augment "none") gives the evaluation view; else the training view drawn from that seed."""

    def __init__(self, files: FileList, image_size: int, resize_size: int,
                 augment: str = "none"):
        if augment not in FOLDER_AUGMENTATIONS:
            raise DataError(f"unknown augment {augment!r} for image-file datasets; valid: "
                                  f"{', '.join(FOLDER_AUGMENTATIONS)}")
        # One numpy byte-string array instead of a list of 1.28M Python strings: forked workers
        # touching list items (reference counts) would copy those pages, each worker its own.
        self.paths = np.array([p.encode() for p in files.paths], dtype=np.bytes_)
        self.labels = files.labels.numpy().copy()
        self.size, self.resize, self.augment = image_size, resize_size, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        row, seed = key if isinstance(key, tuple) else (key, None)
        img = _open_rgb(self.paths[row].decode())
        if seed is None or self.augment == "none":
            x = eval_view(img, self.size, self.resize)
        else:
            x = train_view(img, self.size, np.random.default_rng(seed))
        return x, int(self.labels[row])


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([x for x, _ in items]),
            torch.tensor([y for _, y in items], dtype=torch.int64))


def _keep_decoding_on_preemption(worker_id: int) -> None:
    """A cluster's preemption signal reaches every process of the job. A worker that died of it
    would make the training process fail before it saves; ignoring it, the workers go on until
    the training process has saved and stops them (or its own exit ends them)."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def _batches(dataset: FolderDataset, keys: list[list], workers: int, pin: bool
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=keys, num_workers=workers, collate_fn=_collate, pin_memory=pin,
        prefetch_factor=4 if workers else None, persistent_workers=False,
        worker_init_fn=_keep_decoding_on_preemption if workers else None)
    batches = iter(loader)
    try:
        yield from batches
    except DataError as err:
        # A worker's error arrives wrapped in its traceback: keep the one line that names the
        # file and the problem.
        raise DataError(str(err).strip().splitlines()[-1].split("DataError: ")[-1]) from None
    finally:
        # Workers stop now, not when the iterator is garbage-collected: after an error or an
        # early stop (preemption) a live iterator would be inherited by the next loader's
        # forked workers, whose clean-up then fails on it.
        stop = getattr(batches, "_shutdown_workers", None)
        if stop is not None:
            stop()
        del batches


class FolderTrainLoader:
    """Shuffled, augmented training batches (x float32 [0,1] B x 3 x S x S, y int64) on
    `device`, with TrainLoader's interface (len, views, global_size, state_dict / load_state_dict).

    An epoch is one pass over a permutation drawn from `generator`, in global batches of
    `batch_size` (the last one smaller unless drop_last); under torchrun each rank decodes its
    contiguous share tensor_split(batch, world_size)[rank]. The image at position p of epoch e is
    augmented from the seed (generator.initial_seed(), e, p): see the module docstring.
    """

    views = 1

    def __init__(self, files: FileList, batch_size: int, *, generator: torch.Generator,
                 image_size: int = 224, resize_size: int = 256,
                 augment: str = "resized_crop_flip", drop_last: bool = False,
                 device: torch.device | str | None = None, workers: int = 8,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} is smaller than the {world_size} ranks")
        if workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {workers}")
        self.dataset = FolderDataset(files, image_size, resize_size, augment)
        self.batch_size, self.generator = batch_size, generator
        self.seed = generator.initial_seed()
        self.drop_last, self.workers = drop_last, workers
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rank, self.world_size = rank, world_size
        self.epoch, self.global_size = 0, 0
        self._step, self._resume_step = 0, 0
        self._epoch_start: torch.Tensor | None = None

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        if self.drop_last or n % b == 0 or n % b >= self.world_size:
            return n // b if self.drop_last else math.ceil(n / b)
        return n // b  # the last batch is too small to give every rank an image

    def _plan(self) -> list[list[tuple[int, tuple[int, int, int]]]]:
        perm = torch.randperm(len(self.dataset), generator=self.generator).tolist()
        b, plan = self.batch_size, []
        for i in range(len(self)):
            batch = perm[i * b:(i + 1) * b]
            mine = torch.tensor_split(torch.arange(len(batch)), self.world_size)[self.rank]
            plan.append([(batch[p], (self.seed, self.epoch, i * b + p)) for p in mine.tolist()])
        return plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        first = self._resume_step
        if not first:
            self.epoch += 1
        self._epoch_start, self._resume_step = self.generator.get_state(), 0
        plan = self._plan()
        n, b = len(self.dataset), self.batch_size
        pin = self.device.type == "cuda"
        for step, (x, y) in enumerate(_batches(self.dataset, plan[first:], self.workers, pin),
                                      start=first):
            self._step = step + 1
            self.global_size = min(b, n - step * b)
            yield (to_float(x.to(self.device, non_blocking=True)),
                   y.to(self.device, non_blocking=True))
        self._step = 0

    def state_dict(self) -> dict[str, Any]:
        """Between epochs: the sampler state and epoch. Inside one (after `step` batches): the
        state the epoch's permutation was drawn from and `step`."""
        generator = self._epoch_start if self._step else self.generator.get_state()
        return {"kind": "folder", "generator": generator, "seed": self.seed,
                "epoch": self.epoch, "step": self._step}

    def load_state_dict(self, state: dict[str, Any], augmenter: torch.Tensor | None = None
                        ) -> None:
        """`augmenter` is accepted for TrainLoader's interface and not needed: augmentation is
        keyed by position in the epoch, so a resume on another number of ranks is exact too."""
        if state.get("kind") != "folder":
            raise ValueError("the checkpoint's loader state is not an image-file loader's "
                             "(data.name changed?)")
        self.generator.set_state(state["generator"])
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._resume_step, self._step = int(state["step"]), 0


class FolderEvalSet:
    """An evaluation split of image files: in-order batches of the evaluation view."""

    def __init__(self, files: FileList, image_size: int, resize_size: int, workers: int):
        self.files, self.workers = files, workers
        self.dataset = FolderDataset(files, image_size, resize_size)

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int, device: torch.device, rows: torch.Tensor | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x float32 [0,1], y int64) on `device` for `rows` (default all), in order."""
        rows = torch.arange(len(self)) if rows is None else rows
        keys = [chunk.tolist() for chunk in rows.split(batch_size)]
        for x, y in _batches(self.dataset, keys, self.workers, device.type == "cuda"):
            yield to_float(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
