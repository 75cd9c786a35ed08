"""Throughput of the ImageNet training-data path: ours vs torchvision's usual pipeline.

    python -m bench.imagenet_data [--root IMAGENET_DIR | --images 2000] [--workers 2]
                                  [--batch 128] [--rounds 3] [--device cpu|cuda] [--json OUT]

ours: data.FolderTrainLoader (workers decode and crop, batches travel as uint8, become float on
the device). reference: torchvision ImageFolder + RandomResizedCrop(224) + RandomHorizontalFlip +
ToTensor + Normalize in the same number of workers, batches copied to the device as float32 (what
the KD / long-tail reference scripts run). Both read the same files in shuffled order; the time is
counted from the first batch on the device to the last (worker start-up excluded), in interleaved
rounds; the ratio is the median of the per-round ratios. decode floor: one process only opening
and decoding the same files (PIL), times the number of workers: what decoding alone allows.

Without --root it writes `--images` synthetic JPEGs of ImageNet's typical size (500 x 375,
quality 90, smooth random content) into a temporary ImageFolder, removed afterwards.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_images(root: Path, n: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        # Smooth content (a 24 x 32 random field, upsampled) plus mild noise: JPEG sizes and
        # decode times like photographs, unlike white noise.
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, (375, 500, 3))
        path = root / "train" / f"n{i % classes:08d}" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def _rate(batches, device: torch.device) -> float:
    """Images per second from the first batch on `device` to the last."""
    start, n = None, 0
    for x, _ in batches:
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if start is None:
            start = time.perf_counter()
        else:
            n += len(x)
    return n / (time.perf_counter() - start)


def ours(files, args, device: torch.device, seed: int):
    import data
    return data.FolderTrainLoader(files, args.batch, generator=torch.Generator().manual_seed(seed),
                                  workers=args.workers, device=device)


def reference(root: Path, args, device: torch.device):
    from torchvision import datasets, transforms
    tf = transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    return torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root / "train"), tf), batch_size=args.batch, shuffle=True,
        num_workers=args.workers, pin_memory=device.type == "cuda")


def decode_rate(paths: list[str], limit: int = 200) -> float:
    start = time.perf_counter()
    for p in paths[:limit]:
        with Image.open(p) as img:
            img.convert("RGB")
    return min(limit, len(paths)) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.imagenet_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="an ImageNet directory (train/<wnid>/*.JPEG); default: "
                                  "synthetic JPEGs")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.workers < 1 or args.batch < 1 or args.rounds < 1 or args.images < 2 * args.batch:
        print("bench.imagenet_data: error: --workers, --batch and --rounds must be >= 1 and "
              "--images >= 2 * --batch", file=sys.stderr)
        return 1
    import data
    from errors import DataError
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        if not args.root:
            write_images(root, args.images)
        try:
            files, _ = data.folder.scan_folder(root / "train")
        except DataError as err:
            print(f"bench.imagenet_data: error: {err}", file=sys.stderr)
            return 1
        rounds = []
        for r in range(args.rounds):
            a = _rate(ours(files, args, device, r), device)
            b = _rate(reference(root, args, device), device)
            rounds.append({"ours": a, "reference": b})
            print(f"round {r + 1}: ours {a:.0f} img/s, reference {b:.0f} img/s", flush=True)
        floor = decode_rate(files.paths) * args.workers
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
        or platform.machine(), "torch": torch.__version__, "workers": args.workers,
        "batch": args.batch, "images": len(files), "synthetic": not args.root,
        "ours": statistics.median(r["ours"] for r in rounds),
        "reference": statistics.median(r["reference"] for r in rounds),
        "decode_floor": floor,
        "ratio_ours_vs_reference": statistics.median(r["ours"] / r["reference"] for r in rounds),
        "rounds": rounds}
    print(f"images/s (median of {args.rounds}): ours {result['ours']:.0f}, reference "
          f"{result['reference']:.0f} (x{result['ratio_ours_vs_reference']:.2f}); decoding "
          f"alone in {args.workers} workers: {floor:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
