"""Write a small fake CIFAR-10/100 in torchvision's exact on-disk layout, for tests without network.

The real files are Python-2 cPickle protocol-2 dicts whose keys and strings are py2 `str`; they
load as str under encoding="latin1" (torchvision) and as bytes under encoding="bytes". The writer
below emits the same opcodes, so both readings behave as they do on the real files.
"""
from __future__ import annotations

import os
import pickle
import struct

import numpy as np


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is overridable
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        # A Python-2 `str` is written with the (SHORT_)BINSTRING opcodes, unlike Python-3 bytes.
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump(path: str, obj: dict) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def write_fake_cifar(root: str, name: str = "cifar10", n_train: int = 50, n_test: int = 20,
                     seed: int = 0, test_labels=None) -> dict[str, np.ndarray]:
    """Random images/labels written under root (`test_labels`: the first test labels chosen
    by the caller); returns train_x/test_x (uint8 N×3×32×32, CHW) and train_y/test_y (int64)
    exactly as written."""
    rng = np.random.RandomState(seed)
    num_classes = {"cifar10": 10, "cifar100": 100}[name]
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        out[f"{split}_x"] = rng.randint(0, 256, size=(n, 3, 32, 32)).astype(np.uint8)
        out[f"{split}_y"] = rng.randint(0, num_classes, size=n).astype(np.int64)
    if test_labels is not None:
        out["test_y"][:len(test_labels)] = test_labels
    names = [f"class{i}".encode() for i in range(num_classes)]
    if name == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        chunks = np.array_split(np.arange(n_train), 5)
        files = [(f"data_batch_{i + 1}", "train", idx, f"training batch {i + 1} of 5")
                 for i, idx in enumerate(chunks)]
        files.append(("test_batch", "test", np.arange(n_test), "testing batch 1 of 1"))
        for fname, split, idx, label in files:
            _dump(os.path.join(folder, fname), {
                b"batch_label": label.encode(),
                b"labels": [int(v) for v in out[f"{split}_y"][idx]],
                b"data": out[f"{split}_x"][idx].reshape(len(idx), 3072),
                b"filenames": [f"img_{split}_{i}.png".encode() for i in idx],
            })
        _dump(os.path.join(folder, "batches.meta"),
              {b"num_cases_per_batch": len(chunks[0]), b"label_names": names, b"num_vis": 3072})
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        for split in ("train", "test"):
            y = out[f"{split}_y"]
            _dump(os.path.join(folder, split), {
                b"filenames": [f"img_{split}_{i}.png".encode() for i in range(len(y))],
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": [int(v) for v in y],
                b"coarse_labels": [int(v) // 5 for v in y],
                b"data": out[f"{split}_x"].reshape(len(y), 3072),
            })
        _dump(os.path.join(folder, "meta"), {
            b"fine_label_names": names,
            b"coarse_label_names": [f"super{i}".encode() for i in range(20)]})
    return out
