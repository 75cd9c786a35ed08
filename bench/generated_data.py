"""Resident memory and step throughput of training with vs without a large generated set.

    python -m bench.generated_data [--images 5000000] [--fit-disk 0.25] [--dir DIR]
                                   [--dataset digits] [--model wrn-16-1] [--method ikl_at]
                                   [--epochs 3] [--override KEY=VALUE ...] [--json FILE]

Writes a throwaway generated set of `--images` random images in the prepared format (uint8
images.npy, 3 KB per image: 15.4 GB for 5M; removed afterwards unless --keep), drops it from the
page cache, then trains the same configuration twice in separate processes, real images only and
with `data.generated.fraction` of every batch read from the set, and prints per run: peak and final
resident memory (VmHWM / VmRSS) and training images per second, and the mixed / real ratios. The
defaults run on a CPU (the small digits set, so the data path weighs as much as it can); on a GPU
pass e.g. --dataset cifar10 --model wrn-28-10-swish --batch 512 --device cuda.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_set(path: Path, n: int, num_classes: int) -> float:
    """A prepared set of n random images (written in 64 MB blocks); returns seconds taken."""
    from data.generated import IMAGE_BYTES, IMAGE_SHAPE
    from data.prepare_generated import _npy_header

    start = time.time()
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (1 << 26) // IMAGE_BYTES * IMAGE_BYTES, dtype=np.uint8)
    with open(path / "images.npy", "wb") as f:
        f.write(_npy_header((n, *IMAGE_SHAPE), np.uint8))
        left = n * IMAGE_BYTES
        while left:
            chunk = block[:min(left, len(block))]
            f.write(chunk.tobytes())
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
        # Out of the page cache: the runs read from the disk as a 15-150 GB set would.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    np.save(path / "labels.npy", labels)
    (path / "meta.json").write_text(json.dumps(
        {"n": n, "num_classes": num_classes, "image_shape": list(IMAGE_SHAPE),
         "class_counts": np.bincount(labels, minlength=num_classes).tolist(), "sources": []}))
    return time.time() - start


def _memory() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # MB
    return fields


def child(args: argparse.Namespace) -> None:
    """One training run; prints a JSON line with throughput and memory."""
    from at.config import load_config
    from at.trainer import Trainer

    overrides = [f"data.name={args.dataset}", f"model.name={args.model}",
                 f"method.name={args.method}", f"optim.batch_size={args.batch}",
                 f"optim.epochs={args.epochs}", f"device={args.device}", "log.plot=false",
                 f"out_dir={args.out}", "attack.schedule=fixed", f"attack.steps={args.steps}",
                 "data.download=false", f"data.root={args.data_root}",
                 "data.drop_last=true"]  # full batches only in both runs: same work per image
    if args.dataset == "digits":
        overrides.append("data.val_size=200")  # base.yaml's 1024 is for CIFAR
    overrides += args.override
    if args.generated:
        overrides += [f"data.generated.path={args.generated}",
                      f"data.generated.fraction={args.fraction}"]
    trainer = Trainer(load_config(None, overrides))
    rates = []
    for epoch in range(1, args.epochs + 1):
        trainer.epoch = epoch
        record = trainer.train_epoch()
        rates.append(record["images_per_s"])
    print(json.dumps({"images_per_s": rates[1:] or rates, "steps_per_epoch": len(trainer.loader),
                      **_memory()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5_000_000)
    parser.add_argument("--fit-disk", type=float, metavar="FRACTION",
                        help="write at most this fraction of the free disk (fewer images if "
                        "--images would not fit)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both training runs (repeatable)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--dir", help="where to write the set (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the generated set")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--model", default="wrn-16-1")
    parser.add_argument("--method", default="ikl_at")
    parser.add_argument("--steps", type=int, default=5, help="attack steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="the first is not timed")
    parser.add_argument("--fraction", type=float, default=0.7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--generated", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import data
    num_classes = data.NUM_CLASSES[args.dataset]
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="generated_bench_"))
    gen_dir = base / "set"
    if args.fit_disk:
        base.mkdir(parents=True, exist_ok=True)
        fits = int(shutil.disk_usage(base).free * args.fit_disk) // 3072
        if fits < args.images:
            print(f"--fit-disk {args.fit_disk}: {fits} images instead of {args.images}")
            args.images = fits
    if args.images < 1:
        sys.exit("bench.generated_data: error: --images must be >= 1 (or the disk is full)")
    seconds = 0.0
    try:
        if not (gen_dir / "meta.json").exists():
            seconds = write_set(gen_dir, args.images, num_classes)
            print(f"wrote {args.images} images ({args.images * 3072 / 1e9:.1f} GB) in "
                  f"{seconds:.0f} s", flush=True)
        results = {}
        for name, generated in (("real", None), ("mixed", gen_dir)):
            out = base / f"run_{name}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "bench.generated_data", "--child", "--out", str(out),
                   "--dataset", args.dataset, "--data-root", args.data_root, "--model",
                   args.model, "--method", args.method, "--steps", str(args.steps), "--batch",
                   str(args.batch), "--epochs", str(args.epochs), "--fraction",
                   str(args.fraction), "--device", args.device,
                   *(f"--override={o}" for o in args.override)]
            if generated is not None:
                cmd += ["--generated", str(generated)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{args.dataset} {args.model} {args.method} batch {args.batch} on {args.device}; "
              f"generated set {args.images} images, fraction {args.fraction}")
        print(f"{'run':<8}{'img/s (median)':>16}{'steps/epoch':>13}{'peak RSS MB':>13}"
              f"{'final RSS MB':>14}")
        for name, r in results.items():
            print(f"{name:<8}{np.median(r['images_per_s']):>16.1f}{r['steps_per_epoch']:>13}"
                  f"{r['VmHWM']:>13.0f}{r['VmRSS']:>14.0f}")
        real, mixed = results["real"], results["mixed"]
        ratio = np.median(mixed["images_per_s"]) / np.median(real["images_per_s"])
        print(f"mixed / real: throughput {ratio:.3f}, peak RSS "
              f"{mixed['VmHWM'] - real['VmHWM']:+.0f} MB")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "dataset": args.dataset, "model": args.model, "method": args.method,
                "batch": args.batch, "device": args.device, "images": args.images,
                "fraction": args.fraction, "write_seconds": round(seconds, 1), "runs": results,
                "real_images_per_s": float(np.median(real["images_per_s"])),
                "mixed_images_per_s": float(np.median(mixed["images_per_s"])),
                "throughput_ratio": round(float(ratio), 4),
                "peak_rss_delta_mb": round(mixed["VmHWM"] - real["VmHWM"], 1)}, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
