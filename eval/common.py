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
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

import data as datasets
from at import checkpoint as ckpt
from at.config import git_state
from at.target import Target, load_target
from attacks.pgd import NORMS, eps_problem
from errors import USER_ERRORS, EvalError, report

from .precision import add_tf32_argument, evaluation_precision, tf32_enabled

# The usual radii per threat model (AutoAttack's defaults for L1; RobustBench's for Linf, L2).
DEFAULT_EPS = {"linf": "8/255", "l2": "0.5", "l1": "12"}


def autoattack_norm(norm: str) -> str:
    """'linf' -> 'Linf': a threat model of attacks.pgd.NORMS as AutoAttack spells it, and with it
    --norm and the result files."""
    return norm.capitalize()


def attack_norm(norm: str) -> str:
    """'Linf' -> 'linf': a threat model as --norm, the result files and AutoAttack spell it, under
    its one name in attacks/ and the config (attacks.pgd.NORMS); EvalError for another."""
    valid = [autoattack_norm(n) for n in NORMS]
    if norm not in valid:
        raise EvalError(f"unknown norm {norm!r}; valid: {', '.join(valid)}")
    return norm.lower()


def command_parser(module: str, doc: str,
                   add_arguments: Callable[[argparse.ArgumentParser], None], *,
                   evaluation: bool = True,
                   parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
                   ) -> argparse.ArgumentParser:
    """The command line of `python -m <module>`: the target arguments (add_target_arguments), the
    command's own (`add_arguments`) and --allow-tf32."""
    parser = parser_class(prog=f"python -m {module}", description=doc,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(parser, evaluation=evaluation)
    add_arguments(parser)
    add_tf32_argument(parser)
    return parser


def run_command(module: str, doc: str, argv: list[str] | None,
                add_arguments: Callable[[argparse.ArgumentParser], None],
                body: Callable[[argparse.Namespace], int], *, evaluation: bool = True,
                check: Callable[[argparse.Namespace], None] | None = None) -> int:
    """The frame of every eval command on a model: `python -m <module>` parses its command line
    (`command_parser`), runs `check(args)` (the checks of the arguments alone, before any model
    is loaded; eval.arguments runs the same on a sweep's `eval:` list), then `body(args)` in the
    precision asked for, which returns the exit status. A user error is reported on one line
    (exit 1)."""
    args = command_parser(module, doc, add_arguments, evaluation=evaluation).parse_args(argv)
    try:
        if check is not None:
            check(args)
        with evaluation_precision(args.allow_tf32):
            return body(args)
    except USER_ERRORS as err:
        return report(module, err)


def add_target_arguments(parser: argparse.ArgumentParser, *, evaluation: bool = True,
                         zoo: bool = True) -> None:
    """The arguments every eval entry point takes to say what to evaluate (see `any_target`),
    with `zoo` those of RobustBench targets (rb:...), and, with `evaluation`, on which images
    and at which radius."""
    parser.add_argument("target", help="run directory, a checkpoint file with --arch/--dataset, "
                        "or a RobustBench entry rb:<dataset>/<threat>/<Name> (docs/zoo.md)")
    parser.add_argument("--weights", default="best", help="best | last | avg (run directories)")
    parser.add_argument("--arch", help="model name for a bare checkpoint (e.g. wrn-34-10)")
    parser.add_argument("--dataset",
                        help="dataset for a bare checkpoint (cifar10 | cifar100 | digits) or "
                        "an rb:<Name> target (cifar10 | cifar100 | imagenet)")
    if zoo:
        _add_zoo_arguments(parser)
    if evaluation:
        parser.add_argument("--data-root", help="dataset directory (default: the run's data.root)")
        parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
        parser.add_argument("--n-ex", type=int,
                            help="evaluate the first N test images (default: all)")
        parser.add_argument("--norm", help="Linf | L2 | L1 (default: Linf; an rb: target's "
                            "threat model)")
        parser.add_argument("--eps", help="radius on the [0,1] scale, e.g. 8/255 (default: "
                            "8/255 for Linf, 0.5 for L2, 12 for L1)")
        parser.add_argument("--batch-size", type=_batch_size, default="auto",
                            help="images per batch; auto (default) fills about half of the "
                            "GPU's memory (500 on a CPU)")
        parser.add_argument("--seed", type=int, default=0)


def _add_zoo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threat", help="threat model of an rb:<Name> target (Linf | L2)")
    parser.add_argument("--model-dir", default="models", help="where rb: targets' checkpoints "
                        "are, in RobustBench's layout <dataset>/<threat>/<Name>.pt")
    parser.add_argument("--out", help="results directory (default: <run>/eval, or "
                        "<model-dir>/../zoo/<dataset>_<threat>/<Name> for rb: targets)")


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
    """The target the command line names; fills in --norm (and, for an rb: target, --eps) when
    not given."""
    t = _target_from_arguments(args)
    if hasattr(args, "norm") and args.norm is None:
        args.norm = getattr(t, "threat", None) or "Linf"
    if getattr(args, "eps", "") is None and getattr(t, "threat", None) == args.norm:
        from .zoo_target import LEADERBOARD_EPS  # an rb: target: its leaderboard's radius
        args.eps = LEADERBOARD_EPS.get((t.dataset, t.threat))
    return t


def _target_from_arguments(args: argparse.Namespace) -> Target:
    return any_target(args.target, weights=args.weights, arch=args.arch, dataset=args.dataset,
                      device=getattr(args, "device", None),
                      data_root=getattr(args, "data_root", None),
                      threat=getattr(args, "threat", None),
                      model_dir=getattr(args, "model_dir", "models"),
                      out=getattr(args, "out", None),
                      need_data=hasattr(args, "n_ex"))


def any_target(target: str | Path, *, weights: str = "best", arch: str | None = None,
               dataset: str | None = None, device=None, data_root: str | None = None,
               threat: str | None = None, model_dir: str | Path = "models",
               out: str | Path | None = None, need_data: bool = True) -> Target:
    """A run directory, a checkpoint file (`load_target`) or a RobustBench entry 'rb:...'
    (eval.zoo_target), with its results going to `out` when given."""
    if isinstance(target, str) and target.startswith("rb:"):
        from .zoo_target import load_zoo_target
        return load_zoo_target(target, dataset=dataset, threat=threat, model_dir=model_dir,
                               device=device, data_root=data_root, out=out, need_data=need_data)
    t = load_target(target, weights, arch, dataset, device, data_root)
    if out:
        t.out_dir = Path(out)
    return t


def load_model(target: str | Path, weights: str = "best", arch: str | None = None,
               dataset: str | None = None) -> nn.Module:
    """The model of a run directory (`weights`: best / last / avg) or of a checkpoint file
    (`arch` and `dataset` required; RobustBench state_dicts with or without `module.` /
    `_orig_mod.` prefixes load too), in eval mode, on the GPU when there is one."""
    return load_target(target, weights, arch, dataset).model


def load_test_data(t: Target, n_examples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n_examples` test images (all when None) as float32 in [0,1], on the CPU."""
    if getattr(t, "test_data", None) is not None:  # a zoo entry's own test set (ImageNet)
        return t.test_data(n_examples)
    try:
        return datasets.load_dataset(t.dataset, "test", root=t.data_root, n_examples=n_examples)
    except ValueError as err:
        raise EvalError(str(err)) from err


def check_eps(eps: float, norm: str, x: torch.Tensor) -> None:
    """Refuse an --eps that cannot be a radius around these [0,1] images (8 for 8/255) under
    `norm` (attacks.pgd.NORMS)."""
    problem = eps_problem("--eps", eps, norm, x[0].numel())
    if problem:
        raise EvalError(problem)


def known_norm(args: argparse.Namespace) -> str | None:
    """The threat model (attacks/ spelling: linf, l2, l1) a command will attack under, as far as
    its command line tells before the target is loaded: --norm, else Linf for a run directory or
    a checkpoint (`target_from_arguments`); None for an rb: target without --norm (its threat
    model comes with it). EvalError for an unknown --norm."""
    if args.norm is not None:
        return attack_norm(args.norm)
    return None if str(args.target).startswith("rb:") else "linf"


def check_radius(flag: str, value: float, norm: str | None) -> None:
    """What can be told of a radius before the images are loaded: under Linf it must be < 1 (the
    usual slip, 8 for 8/255). L2 and L1 bounds depend on the image size: `check_eps`."""
    if norm == "linf":
        problem = eps_problem(flag, value, norm, 0)  # the image size plays no part under linf
        if problem:
            raise EvalError(problem)


def eps_argument(args: argparse.Namespace) -> float | None:
    """--eps as read from the command line alone (None when not given), its radius checked as
    far as `check_radius` can."""
    if args.eps is None:
        return None
    value = parse_eps(args.eps)[1]
    check_radius("--eps", value, known_norm(args))
    return value


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
        **({"robustbench_entry": f"{t.dataset}/{t.threat}/{t.name}"} if hasattr(t, "threat")
           else {}),
        "command": " ".join(sys.argv),
    }


def check_writable(folder: Path, hint: str = "make it writable, or evaluate a copy of the run "
                   "or checkpoint elsewhere") -> None:
    """Before any computation: `folder` (created if needed) takes a file, so that hours of
    attacks never end in a read-only or missing place; `hint` says what to do instead."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise EvalError(f"cannot write results to {folder} ({err.strerror or err}); {hint}"
                        ) from None


def write_result(obj: dict, path: Path) -> None:
    """The result file (atomic, at.checkpoint.write_json); when it cannot be written (a full
    disk), the result is printed on stdout first, so that the computation is not lost, and the
    error says so."""
    try:
        ckpt.write_json(obj, path)
    except OSError as err:
        print(json.dumps(obj, indent=2), flush=True)
        why = "disk full" if err.errno == errno.ENOSPC else err.strerror or str(err)
        raise EvalError(f"could not write {path} ({why}); the result is printed on stdout "
                        f"above") from None
