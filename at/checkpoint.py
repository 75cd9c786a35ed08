"""Run-state files: atomic writes, safe loads, and the random-number-generator state of a run.

Checkpoints hold only tensors, numbers, strings, lists and dicts, so they load with
`torch.load(weights_only=True)`: opening a checkpoint never runs code.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message is one line."""


def _read_umask() -> int:
    """The process umask. Linux reports it in /proc without changing it; elsewhere it can only be
    read by setting it (briefly 0o022: a file another thread creates meanwhile gets no
    broader permissions than usual)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: it does not change during a run


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file in the same directory, fsync, then rename over `path`, so
    `path` is always either the previous complete file or the new complete file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    f = None
    try:
        # mkstemp creates the file 0600 (private while half-written); the finished file gets the
        # permissions any other new file would (0644 under the usual umask 022).
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as raw:
            f = _Recording(raw)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if f is not None and f.error is not None and not isinstance(err, OSError):
            # torch.save turns the file's own error (a full disk) into a RuntimeError ("unexpected
            # pos ..."): the caller gets the OSError that says what happened.
            raise f.error from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text(text: str, path: Path) -> None:
    """Atomic (`atomic_write`), creating the parent directories: the file is either absent, the
    previous version or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(obj: Any, path: Path, indent: int | None = 2) -> None:
    """`obj` as JSON through `write_text` (one line with indent=None), ending in a newline."""
    write_text(json.dumps(obj, indent=indent) + "\n", path)
class _Recording:
    """A file that remembers the OSError its last failed write raised."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def keep_copy(path: Path, copy: Path) -> None:
    """Make `copy` an atomically replaced second name of `path`'s current contents: a hard link
    (no data copied) where the file system allows it, else a byte copy."""
    tmp = copy.with_name(f".{copy.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
        os.replace(tmp, copy)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write(copy, lambda f: f.write(path.read_bytes()))


def load(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by this project (weights_only: no arbitrary unpickling)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as err:
        # torch's own message advises weights_only=False, which would run the file's code: wrong
        # advice for a file of unknown origin. Its wording changes between versions ("... was
        # not an allowed global", "unsupported GLOBAL x whose module y is blocked").
        text = str(err)
        named = re.search(r"GLOBAL ([\w.]+)", text)
        if named or "allowed global" in text or _is_pickle(path):
            what = f" (it names {named.group(1)}, which a full load would import and may call)" \
                if named else ""
            raise CheckpointError(f"cannot load checkpoint {path}: refused, it is not a plain "
                                  f"checkpoint of tensors{what}; loading it fully could execute "
                                  f"code from the file: do so only for a file you made "
                                  f"yourself") from err
        raise CheckpointError(f"cannot load checkpoint {path}: not a valid checkpoint (no "
                              f"torch.save file)") from err
    except Exception as err:  # truncated zip, not a torch file, ...
        text = str(err).strip()
        first = text.splitlines()[0].split(". ")[0] if text else ""
        raise CheckpointError(f"cannot load checkpoint {path}: not a valid checkpoint "
                              f"({type(err).__name__}: {first})") from err


def _is_pickle(path: str | Path) -> bool:
    """Whether the file starts as a pickle of protocol 2 or later does (its PROTO opcode): one
    the safe loader refused for what it holds, not for being no pickle at all."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == pickle.PROTO
    except OSError:
        return False


def first_nonfinite(obj: Any, prefix: str = "") -> str | None:
    """The key path of the first floating-point tensor in `obj` (nested dicts and lists) holding
    NaN or inf, or None (a per-tensor device read: cheap next to writing the file)."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(node: Any, key: str) -> None:
        if torch.is_tensor(node):
            if node.is_floating_point() or node.is_complex():
                found.append((key, node))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}" if key else str(i))

    walk(obj, prefix)
    if not found:
        return None
    finite = torch.stack([torch.isfinite(t).all().cpu() for _, t in found])
    bad = (~finite).nonzero()
    return found[int(bad[0])][0] if len(bad) else None


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """Strict load with a one-line message listing (a few) missing and unexpected keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatch: {few(shapes)}" if shapes else ""]
        raise CheckpointError(f"{source} does not fit the model "
                              f"({'; '.join(p for p in parts if p)}): wrong architecture or "
                              f"number of classes?")
    model.load_state_dict(state)


def rng_state(device: torch.device | None = None) -> dict:
    """Every global generator a training step may draw from: python, numpy, torch's CPU one and,
    with a CUDA `device`, that device's (only it: asking for every GPU's state would create a
    CUDA context on each GPU from every process of a multi-GPU run)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[0:3:2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    version, gauss = state["python_pos"]
    random.setstate((version, tuple(state["python"]), gauss))
    pos, has_gauss, cached = state["numpy_pos"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos),
                         int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
