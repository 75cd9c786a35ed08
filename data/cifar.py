"""CIFAR-10/100 read from torchvision's on-disk layout into uint8 N×3×32×32 (CHW) tensors.

The python-pickle batches are decoded directly (vectorised numpy, no PIL); torchvision is used
only to download and extract the official archive when files are missing and download=True.
"""
from __future__ import annotations

import os
import pickle
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from errors import DataError


@dataclass(frozen=True)
class CifarSpec:
    title: str  # human name used in messages
    folder: str  # directory torchvision extracts the archive to, under root
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str  # CIFAR-100 also has coarse labels; the 100-class task uses the fine ones
    num_classes: int
    url: str
    torchvision_class: str  # only used for downloading


CIFAR_SPECS = {
    "cifar10": CifarSpec(
        "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",), "labels", 10,
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "CIFAR10"),
    "cifar100": CifarSpec(
        "CIFAR-100", "cifar-100-python", ("train",), ("test",), "fine_labels", 100,
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "CIFAR100"),
}


def load_cifar(name: str, split: str = "train", root: str = "data",
               download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The official train or test set as (x uint8 N×3×32×32, y int64 N), in file order."""
    spec = CIFAR_SPECS[name]
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} for {name}; valid splits: train, test")
    files = spec.train_files if split == "train" else spec.test_files
    folder = os.path.abspath(os.path.join(root, spec.folder))
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        _fetch(spec, root, folder, missing, download)
    parts = [_read_batch(os.path.join(folder, f), spec) for f in files]
    x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    y = np.concatenate([p[1] for p in parts])
    # Each row is 1024 R, then 1024 G, then 1024 B values, each plane row-major: i.e. CHW.
    return torch.from_numpy(np.ascontiguousarray(x).reshape(-1, 3, 32, 32)), torch.from_numpy(y)


def load_cifar10(split: str = "train", root: str = "data",
                 download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    return load_cifar("cifar10", split, root, download)


def load_cifar100(split: str = "train", root: str = "data",
                  download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    return load_cifar("cifar100", split, root, download)


def _fetch(spec: CifarSpec, root: str, folder: str, missing: list[str], download: bool) -> None:
    """Download missing files, or fail with a one-line message that says how to get them."""
    how = f"download {spec.url} and extract it under {os.path.abspath(root)}"
    lacks = f"{folder} (missing {', '.join(missing)})"
    if not download:
        raise FileNotFoundError(f"{spec.title} not found at {lacks} and download=False; {how}")
    made = _new_paths(spec, root, folder)
    try:
        _download(spec, root)
    except Exception as err:  # no network, bad checksum, disk full...: the cause stays chained
        _remove(made)
        raise FileNotFoundError(
            f"{spec.title} not found at {lacks} and the download failed ({_one_line(err)}); "
            f"{how}") from err
    still = [f for f in missing if not os.path.isfile(os.path.join(folder, f))]
    if still:
        raise FileNotFoundError(
            f"{spec.title} download finished but {folder} still lacks {', '.join(still)}; {how}")


def _new_paths(spec: CifarSpec, root: str, folder: str) -> list[str]:
    """What a download may create that does not exist yet: the topmost missing directory of
    `root` (everything below it is the download's), else the archive and the extraction folder
    inside the existing root."""
    root = os.path.abspath(root)
    top = None
    d = root
    while not os.path.lexists(d):
        top, d = d, os.path.dirname(d)
    if top is not None:
        return [top]
    archive = os.path.join(root, os.path.basename(spec.url))
    return [p for p in (archive, folder) if not os.path.lexists(p)]


def _remove(paths: list[str]) -> None:
    """Undo a failed download: an empty (or half-filled) data.root tree is not a dataset, and
    would hide that nothing was fetched. Only the paths `_new_paths` found missing before."""
    for path in paths:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        except OSError:
            pass  # best effort: the download error is the one to report


def _download(spec: CifarSpec, root: str) -> None:
    # Imported lazily: torchvision is slow to import and only needed here. Its archive URL and
    # md5 are used, so a damaged download is caught by the archive checksum.
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive

    tv = getattr(tvd, spec.torchvision_class)
    os.makedirs(root, exist_ok=True)
    download_and_extract_archive(tv.url, root, filename=tv.filename, md5=tv.tgz_md5)


def _read_batch(path: str, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """One pickle -> (uint8 (N, 3072), int64 (N,)), with its contents checked."""
    try:
        with open(path, "rb") as f:
            # The files are Python-2 pickles; latin1 is the encoding that restores their numpy
            # arrays (as torchvision does). Keys then come back as str, or bytes for other writers.
            entry = pickle.load(f, encoding="latin1")
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data = np.asarray(entry["data"])
        labels = np.asarray(entry[spec.label_key], dtype=np.int64)
    except Exception as err:  # truncated/corrupt pickles raise many types (EOFError, KeyError...)
        raise DataError(f"cannot read {spec.title} file {path} ({_one_line(err)}); "
                               f"it is truncated or corrupt: delete {os.path.dirname(path)} "
                               f"and get it again from {spec.url}") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or labels.shape != (data.shape[0],):
        raise DataError(f"unexpected contents in {path}: data {data.dtype} {data.shape} "
                               f"with {labels.size} labels, expected uint8 (N, 3072) with N labels")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"labels in {path} lie outside [0, {spec.num_classes})")
    return data, labels


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__
