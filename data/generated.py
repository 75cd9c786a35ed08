"""A prepared generated-image set (python -m data.prepare_generated), read in bounded memory.

Images stay on disk: a batch is gathered with one positioned read (pread) per image by a pool of
threads, into (pinned) host memory. Reading through a memory map would also work, but every page
it touches is then counted in the process's resident memory; pread leaves the page cache to the
kernel, so resident memory does not grow with the set (20M images = 61 GB, 50M = 154 GB). The
labels are held in memory as the smallest integer type that fits (1 byte per image for <= 256
classes: 50 MB for 50M images).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from errors import DataError

IMAGE_SHAPE = (32, 32, 3)  # HWC uint8, as the published files
IMAGE_BYTES = 32 * 32 * 3



def _open(path: Path) -> np.ndarray:
    """A read-only memory map of an .npy file; a truncated or foreign file is a one-line error
    naming it (numpy's own says only 'mmap length is greater than file size')."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DataError(f"{path} is missing (prepare the set again)") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a complete .npy file ({err}); truncated? "
                                f"prepare the set again") from None


class GeneratedSet:
    """Images (uint8 N×32×32×3, on disk) and labels (in memory) of a prepared directory."""

    def __init__(self, path: str | Path, num_classes: int, threads: int = 8):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            hint = " (preparation unfinished: run it again to complete)" \
                if (self.path / "images.npy.partial").exists() else \
                " (create it with python -m data.prepare_generated)"
            raise DataError(f"data.generated.path={self.path}: no meta.json{hint}")
        meta = json.loads(meta_path.read_text())
        if meta.get("num_classes") != num_classes:
            raise DataError(f"data.generated.path={self.path} holds "
                                    f"{meta.get('num_classes')}-class images; the dataset has "
                                    f"{num_classes} classes")
        images = self.path / "images.npy"
        # A memory map only to read the header (shape, dtype, data offset); no page is touched.
        mapped = _open(images)
        shape, dtype, self.offset = mapped.shape, mapped.dtype, mapped.offset
        del mapped
        n = int(meta["n"])
        if tuple(shape) != (n, *IMAGE_SHAPE) or dtype != np.uint8:
            raise DataError(f"{images}: {dtype} {shape}, meta.json says uint8 "
                                    f"({n}, 32, 32, 3)")
        if images.stat().st_size != self.offset + n * IMAGE_BYTES:
            raise DataError(f"{images}: {images.stat().st_size} bytes, expected "
                                    f"{self.offset + n * IMAGE_BYTES} (truncated?)")
        labels = _open(self.path / "labels.npy")
        if labels.shape != (n,):
            raise DataError(f"{self.path / 'labels.npy'}: shape {labels.shape}, "
                                    f"expected ({n},)")
        small = np.uint8 if num_classes <= 256 else np.int32
        # Converted in slices: the int64 file is never resident as a whole.
        self.labels = torch.empty(n, dtype=torch.uint8 if small is np.uint8 else torch.int32)
        view = self.labels.numpy()
        for start in range(0, n, 1 << 22):
            part = labels[start:start + (1 << 22)]
            # Checked here, a slice at a time: an out-of-range label would otherwise wrap in the
            # narrow type or fail deep inside a method's loss.
            bad = np.flatnonzero((part < 0) | (part >= num_classes))
            if len(bad):
                raise DataError(
                    f"{self.path / 'labels.npy'}: label {part[bad[0]]} at row "
                    f"{start + int(bad[0])} is outside [0, {num_classes}) (meta.json: "
                    f"{num_classes} classes)")
            view[start:start + (1 << 22)] = part
        del labels
        self.n = n
        self._fd = os.open(images, os.O_RDONLY)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="generated")
        self.threads = threads

    def __len__(self) -> int:
        return self.n

    def gather(self, idx: torch.Tensor, pin: bool = False) -> "PendingBatch":
        """Start reading images `idx` (int64, CPU) into a new N×32×32×3 uint8 tensor; returns a
        handle whose `wait()` gives (images, labels int64)."""
        idx_np = idx.numpy()
        out = torch.empty((len(idx_np), *IMAGE_SHAPE), dtype=torch.uint8, pin_memory=pin)
        view = out.numpy()
        # Reading in sorted order is kinder to the disk; each thread takes one contiguous share.
        order = np.argsort(idx_np, kind="stable")
        shares = np.array_split(order, min(self.threads, max(1, len(order))))
        jobs = []
        for share in shares:
            if len(share):
                jobs.append(self._pool.submit(self._read_scattered, idx_np, share, view))
        return PendingBatch(out, self.labels[idx].long(), jobs)

    def _read_scattered(self, idx: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        fd, offset = self._fd, self.offset
        for r in rows.tolist():
            if os.preadv(fd, [out[r]], offset + int(idx[r]) * IMAGE_BYTES) != IMAGE_BYTES:
                raise OSError(f"{self.path / 'images.npy'}: short read at image {idx[r]}")

    def close(self) -> None:
        if self._fd >= 0:
            self._pool.shutdown(wait=True, cancel_futures=True)
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class PendingBatch:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, jobs: list[Future]):
        self.images, self.labels, self.jobs = images, labels, jobs

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        for job in self.jobs:
            job.result()  # re-raises a read error in the caller
        return self.images, self.labels

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()
        for job in self.jobs:
            if not job.cancelled():
                try:
                    job.result()  # a running read writes into `images`: let it finish first
                except Exception:
                    pass
