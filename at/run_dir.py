"""The run directory's lifecycle: refusing to write over another run, opening it (config.yaml),
the checkpoints (last.pt with its fallback last_prev.pt, best.pt, a mid-epoch last.pt), restoring
a run from them on --resume, and the marker a preempted run leaves for its job script.

Functions take the Trainer (`tr`: its cfg, out, device, rank, world, model, method, optimizer,
loader, avg, epoch, best); only rank 0 writes.
"""
from __future__ import annotations

import copy
import errno
import json
import sys
import time
from pathlib import Path

import torch

import data as datasets

from . import checkpoint as ckpt
from . import distributed
from .config import dump_config, git_state
from .config_check import config_changes
from .errors import NonFiniteLoss, RunError
from .optim import match_state_layout

CHECKPOINT_FORMAT = 2  # 2: loader state with epoch and real-image permutation; no rng state
# Files a run writes before its first checkpoint: a directory holding only these has nothing to
# resume (the run died in epoch 1), so --resume starts it afresh instead of refusing.
PRE_CHECKPOINT_FILES = {"config.yaml", "metrics.jsonl", "curves.png", "wandb"}
PREVIOUS_CHECKPOINT = "last_prev.pt"  # the epoch before last.pt, used if last.pt is unreadable
PREEMPTED_MARKER = "preempted.json"  # written when a signal stopped the run after saving


def check_out_dir(out: Path, resume: bool) -> bool:
    """Whether there is a checkpoint to resume; refuses to write over another run."""
    if out.exists() and not out.is_dir():
        raise RunError(f"out_dir {out} is a file, not a directory; choose another out_dir")
    if resume and ((out / "last.pt").exists()
                   or (out / PREVIOUS_CHECKPOINT).exists()):  # last.pt moved aside
        return True
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not resume:
        if present and not set(present) - PRE_CHECKPOINT_FILES:
            raise RunError(f"out_dir {out} holds a run that stopped before its first "
                           f"checkpoint; pass --resume to start it again there, or remove "
                           f"the directory")
        if present:
            raise RunError(f"out_dir {out} exists and is not empty; pass --resume to "
                           f"continue it or choose another out_dir")
        return False
    if not out.is_dir() or set(present) - PRE_CHECKPOINT_FILES:
        raise RunError(f"--resume: no last.pt in {out}")
    print(f"at.train: {out} has no last.pt (the run stopped in its first epoch); "
          f"starting from epoch 1", file=sys.stderr)
    return False


def open_run_dir(out: Path, cfg: dict, world: int) -> None:
    """Create `out`, drop a previous preemption marker and write config.yaml (rank 0)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / PREEMPTED_MARKER).unlink(missing_ok=True)
        dump_config(cfg, out / "config.yaml", git=git_state(), command=" ".join(sys.argv),
                    world_size=world)
    except OSError as err:  # a read-only or otherwise unwritable place
        raise RunError(f"cannot write to out_dir {out} ({err.strerror or err}); "
                       f"choose another out_dir") from None


def mark_preempted(out: Path, signum: int | None, message: str) -> None:
    """PREEMPTED_MARKER tells a job script to requeue (and only this stop: a requeued error
    would fail forever); --resume removes it."""
    text = json.dumps({"signal": signum, "message": message}) + "\n"
    ckpt.atomic_write(out / PREEMPTED_MARKER, lambda f: f.write(text.encode()))


def _load_last(tr) -> tuple[dict, Path]:
    path = tr.out / "last.pt"
    try:
        return ckpt.load(path, map_location=tr.device), path
    except ckpt.CheckpointError as err:
        # A file damaged after it was written (a disk or copy error: our own writes are
        # atomic) costs one epoch, not the run: the previous epoch's checkpoint is kept.
        previous = tr.out / PREVIOUS_CHECKPOINT
        if not previous.exists():
            raise
        state = ckpt.load(previous, map_location=tr.device)
        aside = ""
        if tr.main and path.exists():
            # The next save would rotate the unreadable last.pt into last_prev.pt and so
            # discard the only good fallback: keep it out of the rotation (and for a look).
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            corrupt = path.with_name(f"{path.name}.corrupt-{stamp}")
            path.rename(corrupt)
            aside = f" (moved aside to {corrupt})"
        print(f"at.train: {err}{aside}; resuming from {previous} (epoch {state['epoch']}) "
              f"instead", file=sys.stderr)
        return state, previous


def restore(tr) -> None:
    """--resume: the trainer's state from last.pt (or last_prev.pt); inside an epoch, the
    partial epoch goes to tr._partial."""
    state, path = _load_last(tr)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} has format {state.get('format')}, "
                       f"expected {CHECKPOINT_FORMAT}")
    changed = config_changes(state["config"], tr.cfg)
    if tr.cfg["optim"]["epochs"] < state["epoch"]:
        # config.yaml would record fewer epochs than the checkpoints hold.
        raise RunError(f"--resume with optim.epochs={tr.cfg['optim']['epochs']}, but "
                       f"{path} has already done {state['epoch']} epochs")
    if changed:
        raise RunError(f"--resume with a config that differs from the run's in: "
                       f"{', '.join(changed)}")
    ckpt.load_model_state(tr.model, state["model"], str(path))
    tr.method.load_state_dict(state["method"])
    tr.optimizer.load_state_dict(state["optimizer"])
    match_state_layout(tr.optimizer)  # a checkpoint of another speed.channels_last
    if tr.avg is not None:
        tr.avg.load_state_dict(state["avg"])
    guard = getattr(tr, "guard", None)  # train.co_guard (at/co_guard.py)
    if guard is not None:
        guard.load_state_dict(state["co_guard"])
    tr.epoch, tr.best = state["epoch"], state["best"]
    partial = state.get("partial")
    if partial is None:
        tr.loader.load_state_dict(state["loader"])
        return
    # Inside an epoch: this rank's generators as they were, or, on another number of
    # ranks, fresh streams (then augmentation and attack starts differ from an uninterrupted
    # run from here on; data order, weights, optimizer and statistics do not).
    same_world = len(partial["ranks"]) == tr.world
    if same_world:
        mine = partial["ranks"][tr.rank]
        # This rank's own buffers: BatchNorm running statistics drift apart between ranks
        # within an epoch (the attack uses them) and method accumulators hold its share.
        _load_buffers(tr, mine["buffers"])
        if guard is not None:  # this rank's last good state
            guard.snapshot = mine.get("co_guard")
    else:
        epoch, step = tr.epoch + 1, partial["step"]
        fresh = torch.Generator().manual_seed(
            datasets.derived_seed(tr.cfg["seed"], epoch, tr.rank, 2, step))
        mine = {"augmenter": fresh.get_state(), "rng": None, "sums": {}, "seen": 0}
        if tr.main:  # the statistics so far, all ranks' together
            for other in partial["ranks"]:
                for k, v in other["sums"].items():
                    mine["sums"][k] = mine["sums"].get(k, 0.0) + v
                mine["seen"] += other["seen"]
        with torch.no_grad():  # the method's epoch accumulators, likewise
            for name in tr.method.accumulators:
                buf = tr.method.get_buffer(name)
                buf.zero_()
                if tr.main:
                    for other in partial["ranks"]:
                        buf += other["buffers"][f"method.{name}"].to(buf)
        reseeded = "attack starts" if isinstance(tr.loader, datasets.FolderTrainLoader) \
            else "augmentation and attack starts"
        print(f"at.train: resuming inside epoch {epoch} on {tr.world} processes "
              f"(saved on {len(partial['ranks'])}): the rest of this epoch's {reseeded} "
              f"are freshly seeded", file=sys.stderr)
    tr.loader.load_state_dict(state["loader"], augmenter=mine["augmenter"])
    tr._partial = {**partial, **mine}


def _load_buffers(tr, buffers: dict) -> None:
    with torch.no_grad():
        for prefix, module in (("model", tr.model), ("method", tr.method)):
            for name, b in module.named_buffers():
                b.copy_(buffers[f"{prefix}.{name}"])


def _state(tr) -> dict:
    """Everything --resume needs (at an epoch end, or with `partial` added inside one)."""
    state = {"format": CHECKPOINT_FORMAT, "epoch": tr.epoch, "config": tr.cfg,
             "model": tr.model.state_dict(), "method": tr.method.state_dict(),
             "optimizer": tr.optimizer.state_dict(), "loader": tr.loader.state_dict(),
             "best": tr.best, "world_size": tr.world}
    if tr.avg is not None:
        state["avg"] = tr.avg.state_dict()
    if getattr(tr, "guard", None) is not None:
        state["co_guard"] = tr.guard.state_dict()
    return state


def _write(tr, obj: dict, name: str) -> None:
    """Atomic write into the run directory; a full disk is a one-line error and leaves the
    previous file as it was (the temporary file is removed)."""
    path = tr.out / name
    bad = ckpt.first_nonfinite(obj)
    if bad is not None:  # a checkpoint of a diverged run would resume or evaluate garbage
        raise NonFiniteLoss(f"{bad} holds NaN/inf at epoch {tr.epoch}: refusing to write "
                            f"{path}; the previous {name} is intact")
    try:
        if name == "last.pt" and path.exists():
            # keep the previous checkpoint as a fallback (see restore)
            ckpt.keep_copy(path, tr.out / PREVIOUS_CHECKPOINT)
        ckpt.atomic_save(obj, path)
    except OSError as err:
        why = "disk full" if err.errno == errno.ENOSPC else err.strerror or str(err)
        raise RunError(f"could not write {path} ({why}); the previous {name} is intact"
                       ) from None
    if name == "last.pt":
        tr._last_save = time.time()


def save_partial(tr, step: int, sums: dict[str, float], seen: int, skipped: int,
                 seconds: float) -> None:
    """last.pt inside epoch tr.epoch, after its `step`-th batch (every rank calls this);
    `sums`, `seen`: this rank's epoch statistics so far (EpochStats.host_sums)."""
    loader = tr.loader.state_dict()
    mine = {"augmenter": loader.get("augmenter"), "rng": ckpt.rng_state(tr.device),
            "sums": sums, "seen": seen,
            "buffers": {f"{prefix}.{name}": b.detach().cpu().clone()
                        for prefix, module in (("model", tr.model), ("method", tr.method))
                        for name, b in module.named_buffers()}}
    if getattr(tr, "guard", None) is not None:  # its last good state (at/co_guard.py)
        mine["co_guard"] = tr.guard.snapshot
    ranks = distributed.gather_objects(mine)
    if tr.main:
        state = _state(tr)
        state["epoch"] = tr.epoch - 1  # completed epochs
        state["loader"] = loader
        state["partial"] = {"step": step, "skipped": skipped, "seconds": seconds,
                            "ranks": ranks}
        _write(tr, state, "last.pt")
    distributed.barrier()
    tr._last_save = time.time()


def save(tr, record: dict) -> None:
    """The epoch end: last.pt, and best.pt when validation improved (rank 0)."""
    state = _state(tr)
    state["metrics"] = record
    # eval.best_on=avg selects on the averaged weights' validation accuracy (Wang et al.).
    key = "avg_val_robust_acc" if tr.cfg["eval"]["best_on"] == "avg" else "val_robust_acc"
    improved = record.get(key) is not None and record[key] > tr.best["val_robust_acc"]
    if improved:
        tr.best = {"val_robust_acc": record[key], "epoch": tr.epoch}
        state["best"] = tr.best
        best = {"format": CHECKPOINT_FORMAT, "epoch": tr.epoch, "config": tr.cfg,
                "model": state["model"], "metrics": record}
        if tr.avg is not None:
            best["avg"] = state["avg"]
        _write(tr, best, "best.pt")
    _write(tr, state, "last.pt")


def load_best(tr) -> tuple[int, torch.nn.Module]:
    """(epoch, a copy of tr.model holding the weights best.pt selected: the averaged ones with
    eval.best_on=avg)."""
    best = ckpt.load(tr.out / "best.pt", map_location=tr.device)
    model = copy.deepcopy(tr.model)
    model.load_state_dict(best["avg"]["model"] if tr.cfg["eval"]["best_on"] == "avg"
                          else best["model"])
    return best["epoch"], model
