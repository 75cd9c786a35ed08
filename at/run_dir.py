"""The run directory's lifecycle: refusing to write over another run, opening it (config.yaml),
the checkpoints (last.pt with its fallback last_prev.pt, best.pt, a mid-epoch last.pt), restoring
a run from them on --resume, and the marker a preempted run leaves for its job script.

Functions take the Trainer (`tr`: its cfg, out, device, rank, world, model, method, optimizer,
loader, avg) and its `RunState`, which they save and `restore` returns; only rank 0 writes.
"""
from __future__ import annotations

import copy
import errno
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data as datasets
from errors import NonFiniteLoss, RunError

from . import checkpoint as ckpt
from . import distributed
from .config import dump_config, flatten, git_state
from .lock import LOCK_FILE, Lock, acquire
from .optim import match_state_layout

CHECKPOINT_FORMAT = 2  # 2: loader state with epoch and real-image permutation; no rng state
# Files a run writes before its first checkpoint: a directory holding only these has nothing to
# resume (the run died in epoch 1), so --resume starts it afresh instead of refusing.
PRE_CHECKPOINT_FILES = {"config.yaml", "metrics.jsonl", "curves.png", "wandb"}
PREVIOUS_CHECKPOINT = "last_prev.pt"  # the epoch before last.pt, used if last.pt is unreadable
PREEMPTED_MARKER = "preempted.json"  # written when a signal stopped the run after saving
# Keys that may change when a run is resumed; anything else would silently change the experiment.
RESUMABLE_CHANGES = ("out_dir", "optim.epochs", "device", "data.root", "data.download",
                     "data.workers", "data.lists", "log.",
                     "eval.every", "eval.batch_size", "eval.n_test", "eval.final_pgd",
                     "checkpoint.", "train.skip_nonfinite", "speed.channels_last",
                     "speed.fused_optimizer", "speed.compile", "train.early_stop.", "reported")
# A generated set may move (another path), but not appear or disappear.
MOVABLE_PATHS = ("data.generated.path",)


@dataclass
class RunState:
    """Where a run stands, saved in last.pt: the completed epochs, the best validation so far
    (best.pt's: {"val_robust_acc", "epoch"}) and, restored from a mid-epoch last.pt, the
    unfinished epoch (`partial`: its step, statistics and this rank's generators)."""
    epoch: int = 0
    best: dict = field(default_factory=lambda: {"val_robust_acc": -math.inf, "epoch": 0})
    partial: dict | None = None


def claim(out: Path, resume: bool) -> tuple[Lock, bool, bool]:
    """Take the run directory for this process (created if needed; at/lock.py: a second
    writer is refused, naming the first) and check it (`check_out_dir`): (the lock, whether
    there is a checkpoint to resume, whether this call created the directory). Nothing is left
    behind when the check refuses."""
    if out.exists() and not out.is_dir():
        raise RunError(f"out_dir {out} is a file, not a directory; choose another out_dir")
    created = not out.is_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = acquire(out / LOCK_FILE, f"out_dir {out}", "at.train")
    except OSError as err:  # a read-only or otherwise unwritable place
        raise RunError(f"cannot write to out_dir {out} ({err.strerror or err}); "
                       f"choose another out_dir") from None
    try:
        if resume and created:
            raise RunError(f"--resume: no last.pt in {out}")
        return lock, check_out_dir(out, resume), created
    except RunError:
        release(out, lock, created)
        raise


def release(out: Path, lock: Lock, created: bool) -> None:
    """Give the run directory up after a refusal before training: the lock, and the directory
    itself when `created` by `claim` and holding nothing but the lock file."""
    lock.release()
    if created:
        (out / LOCK_FILE).unlink(missing_ok=True)
        try:
            out.rmdir()
        except OSError:  # something was written there meanwhile: it stays
            pass


def _leftover(name: str) -> bool:
    """The lock file, or the temporary file of a write that was cut short (atomic_write)."""
    return name == LOCK_FILE or (name.startswith(".") and name.endswith((".tmp", ".link")))


def check_out_dir(out: Path, resume: bool) -> bool:
    """Whether there is a checkpoint to resume; refuses to write over another run."""
    if out.exists() and not out.is_dir():
        raise RunError(f"out_dir {out} is a file, not a directory; choose another out_dir")
    if resume and ((out / "last.pt").exists()
                   or (out / PREVIOUS_CHECKPOINT).exists()):  # last.pt moved aside
        return True
    present = sorted(p.name for p in out.iterdir() if not _leftover(p.name)) \
        if out.is_dir() else []
    if "config.yaml" in present and "last.pt" not in present \
            and PREVIOUS_CHECKPOINT not in present:
        # best.pt is written just before the epoch's last.pt: a run whose first last.pt
        # could not be written (a full disk) holds only it, and starts again like a run
        # that stopped before its first checkpoint.
        present = [n for n in present if n != "best.pt"]
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
    # One line: the job script prints it.
    ckpt.write_json({"signal": signum, "message": message}, out / PREEMPTED_MARKER, indent=None)


def config_changes(saved: dict, cfg: dict) -> list[str]:
    """The dotted keys in which `cfg` differs from a run's saved config and may not (--resume)."""
    old, new = flatten(saved), flatten(cfg)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)
                  and not k.startswith(RESUMABLE_CHANGES)
                  and not (k in MOVABLE_PATHS and old.get(k) and new.get(k)))


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


def restore(tr) -> RunState:
    """--resume: the networks, optimizer, averages and loader of `tr` from last.pt (or
    last_prev.pt), and the run's state (inside an epoch, with the unfinished part)."""
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
    run = RunState(state["epoch"], state["best"])
    partial = state.get("partial")
    if partial is None:
        tr.loader.load_state_dict(state["loader"])
        return run
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
        epoch, step = run.epoch + 1, partial["step"]
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
    run.partial = {**partial, **mine}
    return run


def _load_buffers(tr, buffers: dict) -> None:
    with torch.no_grad():
        for prefix, module in (("model", tr.model), ("method", tr.method)):
            for name, b in module.named_buffers():
                b.copy_(buffers[f"{prefix}.{name}"])


def _state(tr) -> dict:
    """Everything --resume needs (at an epoch end, or with `partial` added inside one)."""
    state = {"format": CHECKPOINT_FORMAT, "epoch": tr.state.epoch, "config": tr.cfg,
             "model": tr.model.state_dict(), "method": tr.method.state_dict(),
             "optimizer": tr.optimizer.state_dict(), "loader": tr.loader.state_dict(),
             "best": tr.state.best, "world_size": tr.world}
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
        raise NonFiniteLoss(f"{bad} holds NaN/inf at epoch {tr.state.epoch}: refusing to write "
                            f"{path}; the previous {name} is intact")
    try:
        if name == "last.pt" and path.exists():
            # keep the previous checkpoint as a fallback (see restore)
            ckpt.keep_copy(path, tr.out / PREVIOUS_CHECKPOINT)
        ckpt.atomic_save(obj, path)
    except OSError as err:
        why = "disk full" if err.errno == errno.ENOSPC else err.strerror or str(err)
        kept = f"the previous {name} is intact" if path.exists() else \
            f"no {name} was written; free space and run again with --resume"
        raise RunError(f"could not write {path} ({why}); {kept}") from None


def save_partial(tr, step: int, sums: dict[str, float], seen: int, skipped: int,
                 seconds: float) -> None:
    """last.pt inside epoch tr.state.epoch, after its `step`-th batch (every rank calls this);
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
        state["epoch"] = tr.state.epoch - 1  # completed epochs
        state["loader"] = loader
        state["partial"] = {"step": step, "skipped": skipped, "seconds": seconds,
                            "ranks": ranks}
        _write(tr, state, "last.pt")
    distributed.barrier()


def save(tr, record: dict, best: bool) -> None:
    """The epoch end: last.pt, and best.pt when `best` (the trainer's rule chose this epoch;
    rank 0)."""
    state = _state(tr)
    state["metrics"] = record
    if best:
        chosen = {"format": CHECKPOINT_FORMAT, "epoch": tr.state.epoch, "config": tr.cfg,
                  "model": state["model"], "metrics": record}
        if tr.avg is not None:
            chosen["avg"] = state["avg"]
        _write(tr, chosen, "best.pt")
    _write(tr, state, "last.pt")


def load_best(tr) -> tuple[int, torch.nn.Module]:
    """(epoch, a copy of tr.model holding the weights best.pt selected: the averaged ones with
    eval.best_on=avg)."""
    best = ckpt.load(tr.out / "best.pt", map_location=tr.device)
    model = copy.deepcopy(tr.model)
    model.load_state_dict(best["avg"]["model"] if tr.cfg["eval"]["best_on"] == "avg"
                          else best["model"])
    return best["epoch"], model
