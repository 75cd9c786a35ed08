"""What every evaluation needs: the model behind a target (a run directory or a checkpoint file),
its test data, where results go, and the provenance recorded with every number.

Checkpoints are always opened with `torch.load(weights_only=True)`, so evaluating a checkpoint
made by somebody else never executes code from it.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

import data as datasets
from at import checkpoint as ckpt
from at.config import git_state
from at.errors import EvalError

# Loading a run or checkpoint lives below eval/ (a distillation teacher needs it too); the names
# stay importable from here.
from at.target import (  # noqa: F401
    PREFIXES,
    WEIGHTS,
    Target,
    _run_checkpoint,
    _state_dict_of,
    load_target,
    sha256,
    strip_prefixes,
)
from attacks.pgd import eps_problem

from .precision import tf32_enabled

# The usual radii per threat model (AutoAttack's defaults for L1; RobustBench's for Linf, L2).
DEFAULT_EPS = {"Linf": "8/255", "L2": "0.5", "L1": "12"}


def add_target_arguments(parser: argparse.ArgumentParser, *, evaluation: bool = True) -> None:
    """The arguments every eval entry point takes to say what to evaluate (see `load_target`),
    and, with `evaluation`, on which images and at which radius."""
    parser.add_argument("target", help="run directory, or a checkpoint file with --arch/--dataset")
    parser.add_argument("--weights", default="best", help="best | last | avg (run directories)")
    parser.add_argument("--arch", help="model name for a bare checkpoint (e.g. wrn-34-10)")
    parser.add_argument("--dataset",
                        help="dataset for a bare checkpoint (cifar10 | cifar100 | digits)")
    if evaluation:
        parser.add_argument("--data-root", help="dataset directory (default: the run's data.root)")
        parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
        parser.add_argument("--n-ex", type=int,
                            help="evaluate the first N test images (default: all)")
        parser.add_argument("--norm", default="Linf", help="Linf | L2 | L1")
        parser.add_argument("--eps", help="radius on the [0,1] scale, e.g. 8/255 (default: "
                            "8/255 for Linf, 0.5 for L2, 12 for L1)")
        parser.add_argument("--batch-size", type=_batch_size, default="auto",
                            help="images per batch; auto (default) fills about half of the "
                            "GPU's memory (500 on a CPU)")
        parser.add_argument("--seed", type=int, default=0)


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


CPU_BATCH = 500  # a CPU has no memory to fill; larger batches are not faster there
PROBE = 64


def auto_batch_size(model: nn.Module, device: torch.device, fraction: float = 0.5,
                    cap: int = 10_000) -> int:
    """An evaluation batch size that fills `fraction` of the GPU's memory with the activations
    of an input-gradient pass (what PGD and AutoAttack run), rounded down to a multiple of 250
    so that the same model on the same kind of GPU gets the same size (AutoAttack's random
    starts depend on the batching, and a resumed evaluation must batch as the first call)."""
    if device.type != "cuda":
        return CPU_BATCH
    x = torch.rand(PROBE, 3, 32, 32, device=device, requires_grad=True)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.enable_grad():
        torch.autograd.grad(model(x).sum(), x)
    per_image = (torch.cuda.max_memory_allocated(device) - base) / PROBE
    total = torch.cuda.get_device_properties(device).total_memory
    size = int(fraction * total / max(per_image, 1.0)) // 250 * 250
    return max(PROBE, min(cap, size))


def resolve_batch_size(batch_size: int | str, t: Target) -> int:
    """--batch-size as given, or `auto_batch_size` for 'auto'."""
    if batch_size != "auto":
        return int(batch_size)
    return auto_batch_size(t.model, next(t.model.parameters()).device)


def target_from_arguments(args: argparse.Namespace) -> Target:
    return load_target(args.target, args.weights, args.arch, args.dataset, args.device,
                       args.data_root)


def load_model(target: str | Path, weights: str = "best", arch: str | None = None,
               dataset: str | None = None) -> nn.Module:
    """The model of a run directory (`weights`: best / last / avg) or of a checkpoint file
    (`arch` and `dataset` required; RobustBench state_dicts with or without `module.` /
    `_orig_mod.` prefixes load too), in eval mode, on the GPU when there is one."""
    return load_target(target, weights, arch, dataset).model


def load_test_data(t: Target, n_examples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n_examples` test images (all when None) as float32 in [0,1], on the CPU."""
    try:
        return datasets.load_dataset(t.dataset, "test", root=t.data_root, n_examples=n_examples)
    except ValueError as err:
        raise EvalError(str(err)) from err


def check_eps(eps: float, norm: str, x: torch.Tensor) -> None:
    """Refuse an --eps that cannot be a radius around these [0,1] images (8 for 8/255)."""
    problem = eps_problem("--eps", eps, norm, x[0].numel())
    if problem:
        raise EvalError(problem)


def parse_eps(text: str) -> tuple[str, float]:
    """'8/255' -> ('8/255', 0.0313...); '0.5' -> ('0.5', 0.5)."""
    try:
        value = float(Fraction(text.replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        raise EvalError(f"cannot read eps {text!r}; write it like 8/255 or 0.5") from None
    if not math.isfinite(value) or value < 0:
        raise EvalError(f"eps must be a finite number >= 0, got {text!r}")
    return text.replace(" ", ""), value


def eps_token(value: float) -> str:
    """eps in a file name: '8-255' for a multiple of 1/255 (the usual L-inf radii), else the
    float ('0.5')."""
    k = round(value * 255)
    if k > 0 and math.isclose(value * 255, k, rel_tol=1e-9):
        return f"{k}-255"
    return repr(float(value))


def result_name(attack: str, norm: str, eps: float, n_ex: int, weights: str) -> str:
    """The stem of a result file, keyed by everything that defines the result, so that a quick
    evaluation (fewer images, another eps) never replaces a full one: e.g.
    pgd20_linf_eps8-255_n10000_best."""
    return f"{attack}_{norm.lower()}_eps{eps_token(eps)}_n{n_ex}_{weights}"


def provenance(t: Target, device: torch.device | str) -> dict:
    """Versions, code and checkpoint identity written next to every result."""
    import pyautoattack
    dev = torch.device(device)
    return {
        "arch": t.arch, "dataset": t.dataset, "weights": t.weights,
        "checkpoint": str(t.checkpoint), "checkpoint_sha256": t.checkpoint_sha256,
        "git": git_state(), "torch": torch.__version__, "pyautoattack": pyautoattack.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "tf32": tf32_enabled(),  # the flags in force (eval/precision.py)
        "command": " ".join(sys.argv),
    }


def write_text(text: str, path: Path) -> None:
    """Atomic: the file is either absent, the previous version or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write(path, lambda f: f.write(text.encode()))


def check_writable(folder: Path) -> None:
    """Before any computation: `folder` (created if needed) takes a file, so that hours of
    attacks never end in a read-only or missing place."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise EvalError(f"cannot write results to {folder} ({err.strerror or err}); make it "
                        f"writable, or evaluate a copy of the run or checkpoint elsewhere"
                        ) from None


def write_json(obj: dict, path: Path) -> None:
    """The result file; when it cannot be written (a full disk), the result is printed on
    stdout first, so that the computation is not lost, and the error says so."""
    text = json.dumps(obj, indent=2) + "\n"
    try:
        write_text(text, path)
    except OSError as err:
        print(text, end="", flush=True)
        why = "disk full" if err.errno == errno.ENOSPC else err.strerror or str(err)
        raise EvalError(f"could not write {path} ({why}); the result is printed on stdout "
                        f"above") from None
