"""The model behind a target (a training run directory or a checkpoint file), loaded for
evaluation, distillation or export, with what identifies it (architecture, dataset, checkpoint
sha256).

Checkpoints are always opened with `torch.load(weights_only=True)`, so loading a checkpoint made by
somebody else never executes code from it. This module sits below both training (a distillation
teacher) and evaluation (eval/), so neither imports the other.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import data as datasets
import models
from errors import ConfigError, EvalError

from . import checkpoint as ckpt
from .config import load_run_config

WEIGHTS = ("best", "last", "avg")
PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


@dataclass
class Target:
    """A model ready for evaluation and everything needed to describe the result."""
    model: nn.Module
    arch: str
    dataset: str
    weights: str          # best / last / avg for a run, the file stem for a bare checkpoint
    checkpoint: Path
    checkpoint_sha256: str
    out_dir: Path         # <run>/eval or <checkpoint dir>/eval
    data_root: str
    run_dir: Path | None = None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def strip_prefixes(state: dict) -> dict:
    """Remove wrapper prefixes (`module.`, `_orig_mod.`, in any nesting) from the keys."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _state_dict_of(obj, path: Path) -> dict:
    """The model weights inside a loaded checkpoint: ours ({'model': ...}), the common
    {'state_dict': ...} wrapper, or a plain state_dict (RobustBench)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise EvalError(f"{path} holds no state_dict of tensors")
    return strip_prefixes(obj)


class DatasetMismatch(EvalError):
    """A bare checkpoint whose first or last layer does not fit the dataset it is loaded for:
    its number of `what` ("outputs": classes, or "input channels") is `found`, a model of
    `dataset` has `expected`."""

    def __init__(self, path: Path, what: str, found: int, expected: int, dataset: str):
        super().__init__(f"{path} has {found} {what}, but a {dataset} model has {expected}: it "
                         f"is a model of another dataset (or give the --dataset it was trained "
                         f"on)")
        self.what, self.found, self.expected, self.dataset = what, found, expected, dataset


def dataset_mismatch(model: nn.Module, state: dict, path: Path, dataset: str
                     ) -> DatasetMismatch | None:
    """What of `state` (a bare checkpoint's weights) shows it is not a model of `dataset`, where
    its weights tell: the outputs of the last linear layer (the classes) and the input channels
    of the first convolution of `model` (its architecture built for `dataset`). The input
    resolution is not in a convolutional network's weights: such a mismatch goes unseen."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    own = model.state_dict()
    for what, layers, dim in (("outputs", linears[-1:], 0), ("input channels", convs[:1], 1)):
        for key in (f"{name}.weight" for name in layers):
            theirs = state.get(key)
            if key in own and torch.is_tensor(theirs) and theirs.dim() == own[key].dim() \
                    and theirs.shape[dim] != own[key].shape[dim]:
                return DatasetMismatch(path, what, theirs.shape[dim], own[key].shape[dim],
                                       dataset)
    return None


def _run_checkpoint(run_dir: Path, weights: str, best_on: str = "model"
                    ) -> tuple[Path, str | None]:
    """(file, key inside it) for the requested weights of a training run; `best` of a run that
    selected on its averaged weights (eval.best_on=avg) is the average kept in best.pt."""
    if weights not in WEIGHTS:
        raise EvalError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    if weights == "avg":
        return run_dir / "last.pt", "avg"
    path = run_dir / f"{weights}.pt"
    if not path.exists():
        hint = " (the run has no validation split: use --weights last)" if weights == "best" else ""
        raise EvalError(f"{path} not found{hint}")
    return path, "avg" if weights == "best" and best_on == "avg" else None


def load_target(target: str | Path, weights: str = "best", arch: str | None = None,
                dataset: str | None = None, device: str | torch.device | None = None,
                data_root: str | None = None) -> Target:
    """Resolve `target` (a run directory or a checkpoint file) into a model in eval mode."""
    target = Path(target)
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # 'gpu', a typo
        raise EvalError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device {device} requested but CUDA is not available; use --device cpu")
    if target.is_dir():
        if not (target / "config.yaml").exists():
            raise EvalError(f"{target} is not a run directory (no config.yaml)")
        try:
            cfg = load_run_config(target)
        except ConfigError as err:
            raise EvalError(str(err)) from err
        run_arch, run_dataset = cfg["model"]["name"], cfg["data"]["name"]
        for given, actual, what in ((arch, run_arch, "arch"), (dataset, run_dataset, "dataset")):
            if given is not None and given != actual:
                raise EvalError(f"--{what} {given} contradicts the run's {what} {actual}")
        arch, dataset = run_arch, run_dataset
        # An image-file dataset may be a subset of its classes (data.num_classes).
        num_classes = cfg["data"].get("num_classes")
        path, key = _run_checkpoint(target, weights, cfg["eval"]["best_on"])
        out_dir, run_dir = target / "eval", target
        data_root = data_root or cfg["data"]["root"]
    elif target.is_file():
        if arch is None or dataset is None:
            raise EvalError(f"{target} is a bare checkpoint: give --arch and --dataset")
        path, key, weights = target, None, target.stem
        num_classes = None
        out_dir, run_dir = target.parent / "eval", None
        data_root = data_root or "data"
    else:
        raise EvalError(f"{target} does not exist (expected a run directory or a checkpoint)")

    if dataset not in datasets.NUM_CLASSES:
        raise EvalError(f"unknown dataset {dataset!r}; valid: {', '.join(datasets.NUM_CLASSES)}")
    try:
        model = models.build_model(arch, num_classes or datasets.NUM_CLASSES[dataset],
                                   dataset=dataset)
    except ValueError as err:
        raise EvalError(str(err)) from err
    try:
        loaded = ckpt.load(path)
    except ckpt.CheckpointError as err:
        raise EvalError(str(err)) from err
    if key is not None:
        if key not in loaded:
            raise EvalError(f"{path} has no weight-averaged model ('{key}'): the run did not "
                            f"average weights")
        loaded = loaded[key]
    state = _state_dict_of(loaded, path)
    mismatch = dataset_mismatch(model, state, path, dataset) if run_dir is None else None
    if mismatch is not None:  # named as such, not as a wrong architecture
        raise mismatch
    try:
        ckpt.load_model_state(model, state, f"{path} ({arch}, {dataset})")
    except ckpt.CheckpointError as err:
        raise EvalError(str(err)) from err
    model = model.to(device).float().eval()
    return Target(model, arch, dataset, weights, path, sha256(path), out_dir, data_root, run_dir)
