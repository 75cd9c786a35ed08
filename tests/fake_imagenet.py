"""Write the real UCI digits (shipped with scikit-learn) as an ImageNet-layout dataset of JPEGs.

ROOT/train/<wnid>/<wnid>_<i>.JPEG, ROOT/val/<wnid>/ILSVRC2012_val_<n>.JPEG (the validation
images sorted into class folders) and ImageNet-LT-style split lists (ImageNet_LT_train.txt /
_val.txt / _test.txt, "relative/path label" lines): the layouts data/folder.py reads. The images
get varied sizes and aspect ratios (as ImageNet's), so resizing and cropping are exercised.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data.digits import load_digits

WNIDS = [f"n{1440764 + 17 * k:08d}" for k in range(10)]  # sorted, like real wnids


def _image(x: np.ndarray, index: int) -> Image.Image:
    """A 3 x 32 x 32 uint8 digit as an RGB image of one of four sizes (portrait / landscape)."""
    img = Image.fromarray(np.ascontiguousarray(x.transpose(1, 2, 0)))
    size = [(40, 40), (48, 36), (36, 52), (64, 44)][index % 4]
    return img.resize(size, Image.BILINEAR)


def write_fake_imagenet(root: Path, lt_decay: float = 0.7) -> dict:
    """Digits "train" -> train/, "test" -> val/; the LT lists keep a long-tailed subset of each
    class's training images (n_c = max(4, n * lt_decay ** c)), the next 5 of each class as the
    LT validation list and the val/ images as the LT test list. Returns the written labels."""
    written = {"train": [], "val": []}
    for split, folder in (("train", "train"), ("test", "val")):
        x, y = load_digits(split)
        for i, (img, label) in enumerate(zip(x.numpy(), y.tolist())):
            wnid = WNIDS[label]
            name = f"{wnid}_{i}.JPEG" if folder == "train" else f"ILSVRC2012_val_{i:08d}.JPEG"
            path = root / folder / wnid / name
            path.parent.mkdir(parents=True, exist_ok=True)
            _image(img, i).save(path, quality=95)
            written[folder].append((f"{folder}/{wnid}/{name}", label))
    lt_train, lt_val = [], []
    for c in range(10):
        mine = sorted(p for p in written["train"] if p[1] == c)
        keep = max(4, int(len(mine) * lt_decay ** c))
        lt_train += mine[:keep]
        lt_val += mine[keep:keep + 5]
    for name, rows in (("train", lt_train), ("val", lt_val), ("test", written["val"])):
        (root / f"ImageNet_LT_{name}.txt").write_text(
            "".join(f"{path} {label}\n" for path, label in rows))
    return {"train": written["train"], "val": written["val"], "lt_train": lt_train,
            "lt_val": lt_val}
