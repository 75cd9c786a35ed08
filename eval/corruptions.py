"""Accuracy under common corruptions: CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019,
arXiv 1903.12261) in RobustBench's on-disk format.

    python -m eval.corruptions runs/cifar10_ikl_at --corruptions-root data [--n-ex 10000]

The root holds CIFAR-10-C/ (or CIFAR-100-C/), or is that folder: one <corruption>.npy per
corruption, uint8 of shape (50000, 32, 32, 3) (the 10000 test images at severity 1, then 2, ...
5, stacked), and labels.npy (50000,). Writes <out_dir>/corruptions_n<images>_<weights>.json with
the accuracy per corruption and severity, the mean per corruption and per severity, and the
mean over all (RobustBench's "corruptions" number is this mean over the 15 corruptions and 5
severities of the full test set).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data as datasets
from at.target import Target
from attacks.accuracy import correct

from .common import (
    EvalError,
    check_writable,
    provenance,
    resolve_batch_size,
    run_command,
    target_from_arguments,
    write_result,
)
from .results import corruptions_name

# RobustBench's list (robustbench.data.CORRUPTIONS): the 15 of the benchmark.
CORRUPTIONS = ("shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur",
               "brightness", "fog", "zoom_blur", "frost", "glass_blur", "impulse_noise",
               "contrast", "jpeg_compression", "elastic_transform")
FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
SEVERITIES = 5
PER_SEVERITY = 10_000
SHAPE = (SEVERITIES * PER_SEVERITY, 32, 32, 3)


def corruptions_dir(root: Path, dataset: str) -> Path:
    if dataset not in FOLDERS:
        raise EvalError(f"corruption benchmarks exist for {', '.join(FOLDERS)}, not {dataset}")
    if not root.is_dir():
        raise EvalError(f"corruptions root {root} does not exist")
    folder = root / FOLDERS[dataset]
    if folder.is_dir():
        return folder
    if root.name == FOLDERS[dataset]:
        return root
    raise EvalError(f"{root} has no {FOLDERS[dataset]} folder (RobustBench's layout: "
                    f"<root>/{FOLDERS[dataset]}/<corruption>.npy and labels.npy)")


def load_npy(path: Path, shape: tuple[int, ...], integer: bool = False) -> np.ndarray:
    """A memory-mapped array of exactly `shape` (uint8, or any integer type for labels); a
    missing, truncated or malformed file is a one-line EvalError naming it."""
    if not path.is_file():
        raise EvalError(f"{path} is missing")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise EvalError(f"corrupt .npy file {path} ({str(err).splitlines()[0]})") from None
    ok_type = np.issubdtype(arr.dtype, np.integer) if integer else arr.dtype == np.uint8
    if arr.shape != shape or not ok_type:
        raise EvalError(f"corrupt .npy file {path}: {arr.dtype} {arr.shape}, expected "
                        f"{'integers' if integer else 'uint8'} {shape}")
    return arr


def evaluate(t: Target, root: str | Path, *, n_ex: int | None = None,
             corruptions: list[str] | None = None, severities: list[int] | None = None,
             batch_size: int = 500) -> dict:
    """Accuracy (percent) of `t` on the first `n_ex` images of each severity of each
    corruption; also written to <out_dir>/corruptions_n<n>_<weights>.json (a subset of the
    corruptions or severities to corruptions-<subset>_s<severities>_n<n>_<weights>.json)."""
    folder = corruptions_dir(Path(root), t.dataset)
    corruptions = list(corruptions or CORRUPTIONS)
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise EvalError(f"unknown corruption {unknown[0]!r}; valid: {', '.join(CORRUPTIONS)}")
    severities = list(severities or range(1, SEVERITIES + 1))
    if any(s not in range(1, SEVERITIES + 1) for s in severities):
        raise EvalError(f"severities must be among 1..{SEVERITIES}, got {severities}")
    n = PER_SEVERITY if n_ex is None else n_ex
    if not 1 <= n <= PER_SEVERITY:
        raise EvalError(f"--n-ex must be in [1, {PER_SEVERITY}], got {n}")
    missing = [c for c in corruptions if not (folder / f"{c}.npy").is_file()]
    if missing:
        raise EvalError(f"{folder} lacks {len(missing)} corruption files ({', '.join(missing)}"
                        f".npy); choose others with --corruptions")
    check_writable(t.out_dir)  # before any computation
    labels = load_npy(folder / "labels.npy", (SHAPE[0],), integer=True)
    classes = datasets.NUM_CLASSES[t.dataset]
    used = np.concatenate([np.asarray(labels[(s - 1) * PER_SEVERITY:(s - 1) * PER_SEVERITY + n])
                           for s in severities])
    if used.min() < 0 or used.max() >= classes:
        raise EvalError(f"{folder / 'labels.npy'} holds labels outside [0, {classes})")
    # Every file is checked before the first is evaluated: no half run on a broken download.
    arrays = {name: load_npy(folder / f"{name}.npy", SHAPE) for name in corruptions}
    started = time.time()
    acc: dict[str, dict[str, float]] = {}
    for name, images in arrays.items():
        acc[name] = {}
        for s in severities:
            rows = slice((s - 1) * PER_SEVERITY, (s - 1) * PER_SEVERITY + n)
            x = torch.from_numpy(np.array(images[rows])).permute(0, 3, 1, 2)
            y = torch.from_numpy(np.asarray(labels[rows]).astype(np.int64))
            acc[name][str(s)] = round(100 * correct(t.model, x, y, batch_size=batch_size)
                                      .double().mean().item(), 2)

    def mean(values):
        return round(sum(values) / len(values), 2)

    result = {
        "accuracy": acc,
        "mean_per_corruption": {c: mean(list(v.values())) for c, v in acc.items()},
        "mean_per_severity": {str(s): mean([acc[c][str(s)] for c in corruptions])
                              for s in severities},
        "mean": mean([a for v in acc.values() for a in v.values()]),
        "corruptions": corruptions, "severities": severities, "n_ex": n,
        "full_benchmark": corruptions == list(CORRUPTIONS) and n == PER_SEVERITY
        and severities == list(range(1, SEVERITIES + 1)),
        "root": str(folder), "batch_size": batch_size,
        "seconds": round(time.time() - started, 1),
        **provenance(t, next(t.model.parameters()).device),
    }
    # A subset (corruptions, severities, images) has its own file: it never replaces the full one.
    name = corruptions_name(corruptions, list(CORRUPTIONS), severities, n, t.weights)
    path = t.out_dir / f"{name}.json"
    write_result(result, path)
    result["path"] = str(path)
    return result


def main(argv: list[str] | None = None) -> int:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--corruptions-root", required=True,
                       help="directory holding CIFAR-10-C/ or CIFAR-100-C/")
        p.add_argument("--corruptions", help="comma-separated subset (default: all 15)")
        p.add_argument("--severities", default="1,2,3,4,5")
        p.add_argument("--n-ex", type=int, help="first N images of each severity (default 10000)")
        p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
        p.add_argument("--batch-size", default="500")

    def run(args: argparse.Namespace) -> int:
        args.data_root = None
        try:
            severities = [int(s) for s in args.severities.split(",")]
            batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
        except ValueError:
            raise EvalError("--severities and --batch-size take integers") from None
        t = target_from_arguments(args)
        r = evaluate(t, args.corruptions_root, n_ex=args.n_ex,
                     corruptions=args.corruptions.split(",") if args.corruptions else None,
                     severities=severities, batch_size=resolve_batch_size(batch, t))
        for c in r["corruptions"]:
            row = "  ".join(f"{r['accuracy'][c][str(s)]:6.2f}" for s in r["severities"])
            print(f"{c:18s} {row}   mean {r['mean_per_corruption'][c]:6.2f}")
        print(f"mean over {len(r['corruptions'])} corruptions x {len(r['severities'])} "
              f"severities on {r['n_ex']} images each: {r['mean']:.2f}% -> {r['path']}")
        return 0

    return run_command("eval.corruptions", __doc__, argv, arguments, run, evaluation=False)


if __name__ == "__main__":
    sys.exit(main())
