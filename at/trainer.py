"""The one training loop for every method: data -> model -> method -> epochs -> run directory.

Run directory: config.yaml (resolved config + git state), metrics.jsonl (one record per epoch),
curves.png, last.pt (everything needed to continue), best.pt (best validation PGD accuracy) and
final.json (test clean / PGD accuracy of the best and last weights).

Under torchrun every rank runs this loop on its share of each global batch (optim.batch_size is
the global batch); the outer loss goes through DistributedDataParallel, statistics and validation
are summed over ranks, and only rank 0 writes the run directory (at/distributed.py).
"""
from __future__ import annotations

import copy
import errno
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data as datasets
import models
from attacks.pgd import INITS, NORMS, eps_problem
from attacks.utils import BN_MODES
from data.generated import GeneratedSet
from models.bn import set_bn_groups, set_bn_momentum

from . import averaging, distributed, speed, sync_bn
from . import checkpoint as ckpt
from .awp import AWP
from .config import dump_config, git_state
from .errors import NonFiniteLoss, Preempted, RunError
from .evaluate import correct_batches, shot_accuracies
from .methods import Method, build_method
from .optim import build_optimizer, match_state_layout
from .progress import Progress
from .run_log import RunLog, require_wandb
from .schedules import ATTACK_SCHEDULES, LR_SCHEDULES, attack_budget, lr_at, momentum_at

CHECKPOINT_FORMAT = 2  # 2: loader state with epoch and real-image permutation; no rng state
# Files a run writes before its first checkpoint: a directory holding only these has nothing to
# resume (the run died in epoch 1), so --resume starts it afresh instead of refusing.
PRE_CHECKPOINT_FILES = {"config.yaml", "metrics.jsonl", "curves.png", "wandb"}
PREVIOUS_CHECKPOINT = "last_prev.pt"  # the epoch before last.pt, used if last.pt is unreadable
MAX_SKIPPED_SHARE = 0.5  # train.skip_nonfinite never skips more than this share of an epoch
PREEMPTED_MARKER = "preempted.json"  # written when a signal stopped the run after saving
# Keys that may change when a run is resumed; anything else would silently change the experiment.
RESUMABLE_CHANGES = ("out_dir", "optim.epochs", "device", "data.root", "data.download",
                     "data.workers", "data.lists", "log.",
                     "eval.every", "eval.batch_size", "eval.n_test", "eval.final_pgd",
                     "checkpoint.", "train.skip_nonfinite", "speed.channels_last",
                     "speed.fused_optimizer", "speed.compile")
# A generated set may move (another path), but not appear or disappear.
MOVABLE_PATHS = ("data.generated.path",)


def check_config(cfg: dict) -> None:
    """Reject values that would fail late (after hours) or silently mean something else."""
    o, a, e = cfg["optim"], cfg["attack"], cfg["eval"]
    checks = [
        (o["epochs"] >= 1, "optim.epochs must be >= 1"),
        (o["batch_size"] >= 1, "optim.batch_size must be >= 1"),
        (o["lr"] > 0, "optim.lr must be > 0"),
        (0 <= o["warmup_epochs"] <= o["epochs"],
         "optim.warmup_epochs must be in [0, optim.epochs]"),
        (o["schedule"] in LR_SCHEDULES, f"optim.schedule must be one of {', '.join(LR_SCHEDULES)}"),
        (a["schedule"] in ATTACK_SCHEDULES,
         f"attack.schedule must be one of {', '.join(ATTACK_SCHEDULES)}"),
        (a["norm"] in NORMS, f"attack.norm must be one of {', '.join(NORMS)}"),
        (a["init"] in INITS, f"attack.init must be one of {', '.join(INITS)}"),
        (a["bn"] in BN_MODES, f"attack.bn must be one of {', '.join(BN_MODES)}"),
        (a["eps"] >= 0 and a["step_size"] >= 0, "attack.eps and attack.step_size must be >= 0"),
        (a["steps"] >= 0 and e["pgd_steps"] >= 0, "attack.steps and eval.pgd_steps must be >= 0"),
        (e["every"] >= 1 and e["batch_size"] >= 1, "eval.every and eval.batch_size must be >= 1"),
        (e["n_test"] is None or e["n_test"] >= 1, "eval.n_test must be null or >= 1"),
        (e["best_on"] in ("model", "avg"), "eval.best_on must be model or avg"),
        (e["best_on"] == "model" or cfg["avg"]["kind"] != "none",
         "eval.best_on=avg needs weight averaging (avg.kind)"),
        (cfg["log"]["interval"] >= 1, "log.interval must be >= 1"),
        (cfg["model"]["bn_groups"] >= 1, "model.bn_groups must be >= 1"),
        (cfg["model"]["bn_groups"] == 1 or not cfg["model"]["sync_bn"],
         "model.bn_groups > 1 (per-GPU statistics) contradicts model.sync_bn (global statistics)"),
        (cfg["model"]["bn_first_momentum"] is None or
         0 < cfg["model"]["bn_first_momentum"] <= 1,
         "model.bn_first_momentum must be null or in (0, 1]"),
        (_cycle_ok(o["cycle_momentum"], o["schedule"]),
         "optim.cycle_momentum must be null or [low, high] with 0 <= low <= high < 1, and "
         "needs optim.schedule=onecycle"),
        (cfg["awp"]["gamma"] >= 0 and cfg["awp"]["warmup"] >= 0,
         "awp.gamma and awp.warmup must be >= 0"),
        (0 <= cfg["data"]["generated"]["fraction"] <= 1,
         "data.generated.fraction must be in [0, 1]"),
        (cfg["checkpoint"]["every_minutes"] >= 0, "checkpoint.every_minutes must be >= 0"),
        (cfg["train"]["skip_nonfinite"] >= 0, "train.skip_nonfinite must be >= 0"),
    ]
    d = cfg["data"]
    if d["name"] in datasets.FOLDER_DATASETS:
        checks += [
            (d["augment"] in datasets.FOLDER_AUGMENTATIONS,
             f"data.augment for {d['name']} must be one of "
             f"{', '.join(datasets.FOLDER_AUGMENTATIONS)}"),
            (d["second_view"] is None and d["generated"]["path"] is None,
             f"data.second_view and data.generated are for CIFAR, not {d['name']}"),
            (d["image_size"] >= 32 and d["resize_size"] >= d["image_size"],
             "data.image_size must be >= 32 and data.resize_size >= data.image_size"),
            (d["workers"] >= 0, "data.workers must be >= 0"),
            (d["num_classes"] is None or d["num_classes"] >= 2,
             "data.num_classes must be null or >= 2"),
        ]
    else:
        checks.append((d["augment"] in datasets.AUGMENTATIONS,
                       f"data.augment for {d['name']} must be one of "
                       f"{', '.join(datasets.AUGMENTATIONS)}"))
        checks.append((d["num_classes"] is None,
                       f"data.num_classes is for image-file datasets; {d['name']} has "
                       f"{datasets.NUM_CLASSES.get(d['name'])} classes (leave it null)"))
    for ok, message in checks:
        if not ok:
            raise RunError(message)
    side = d["image_size"] if d["name"] in datasets.FOLDER_DATASETS else 32  # CIFAR, digits
    problem = eps_problem("attack.eps", a["eps"], a["norm"], 3 * side * side)
    if problem:
        raise RunError(problem)
    errors = speed.check(cfg["speed"])
    if errors:
        raise RunError(errors[0])
    try:
        averaging.check_config(cfg["avg"])
    except ValueError as err:
        raise RunError(str(err)) from None


def _cycle_ok(cycle, schedule: str) -> bool:
    if cycle is None:
        return True
    return (schedule == "onecycle" and isinstance(cycle, list) and len(cycle) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cycle)
            and 0 <= cycle[0] <= cycle[1] < 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device={name} requested but CUDA is not available")
    return torch.device(name)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v
    return flat


def _config_changes(saved: dict, cfg: dict) -> list[str]:
    old, new = _flatten(saved), _flatten(cfg)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)
                  and not k.startswith(RESUMABLE_CHANGES)
                  and not (k in MOVABLE_PATHS and old.get(k) and new.get(k)))


class _Objective(nn.Module):
    """The outer loss as one module call, so that DistributedDataParallel sees the model and the
    method's own modules (LBGAT's natural model) in one forward and averages all their gradients."""

    def __init__(self, model: nn.Module, method: Method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x, y, x_adv, views):
        return self.method.loss(self.model, x, y, x_adv, views)


class Trainer:
    def __init__(self, cfg: dict, *, resume: bool = False,
                 splits: datasets.Splits | None = None):
        """`splits`: data to train on instead of loading `data.name` (benchmarks); the config
        still decides everything else."""
        check_config(cfg)
        self.cfg, self.out = cfg, Path(cfg["out_dir"])
        if distributed.launched():
            self.device = distributed.init(cfg["device"])
        else:
            self.device = resolve_device(cfg["device"])
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        # Rank 0 inspects the run directory (the others would see the files it writes next).
        verdict = None
        if self.main:
            try:
                verdict = ("resume" if self._check_out_dir(resume) else "new", None)
            except RunError as err:
                verdict = ("error", str(err))
        verdict = distributed.broadcast_object(verdict)
        if verdict[0] == "error":
            raise RunError(verdict[1])
        resume = verdict[0] == "resume"
        if cfg["log"]["wandb"] and self.main:
            require_wandb()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        ckpt.seed_everything(cfg["seed"])  # the same initial weights on every rank

        num_classes = self.num_classes = self._build_data(splits)
        # Training images per class of a long-tailed set (ImageNet-LT): final.json then also
        # reports many / medium / few-shot accuracy.
        self.train_counts = torch.bincount(self.splits.train.labels, minlength=num_classes) \
            if cfg["data"]["name"] == "imagenet_lt" else None
        dcfg = cfg["data"]
        self.model = models.build_model(cfg["model"]["name"], num_classes, dataset=dcfg["name"],
                                        bn_momentum=cfg["model"]["bn_momentum"]).to(self.device)
        self.method: Method = build_method(cfg["method"], num_classes).to(self.device)
        if cfg["model"]["sync_bn"]:
            sync_bn.convert(self.model)
            sync_bn.convert(self.method)
        if cfg["model"]["bn_groups"] > 1:  # ghost BatchNorm: nn.DataParallel's statistics
            set_bn_groups(self.model, cfg["model"]["bn_groups"])
            set_bn_groups(self.method, cfg["model"]["bn_groups"])
        self.speed = cfg["speed"]
        speed.prepare_model(self.model, self.speed)
        if self.speed["channels_last"]:  # a method's own networks (LBGAT's natural model)
            self.method.to(memory_format=torch.channels_last)
        objective = _Objective(self.model, self.method)
        # No buffer sync per forward: rank 0 would overwrite the other ranks' method statistics
        # (the IKL-AT prior sums) every step; buffers are synchronised once per epoch instead.
        self.objective = objective if self.world == 1 else DDP(
            objective, device_ids=[self.device] if self.device.type == "cuda" else None,
            forward_sync_buffers=False)
        if self.loader.views > 1 and not self.method.supports_views:
            raise RunError(f"data.second_view={dcfg['second_view']} needs a method that weights "
                           f"the two views (ikl_at); {cfg['method']['name']} does not")
        self.optimizer = build_optimizer(cfg["optim"], [self.model, self.method],
                                         fused=self.speed["fused_optimizer"])
        a = cfg["awp"]
        # protect: a method's own modules (LBGAT's natural model) keep their BN statistics.
        self.awp = AWP(self.model, gamma=a["gamma"], warmup=a["warmup"],
                       protect=[self.method]) if a["enabled"] else None
        self.avg = averaging.from_config(self.model, cfg["avg"], epochs=cfg["optim"]["epochs"],
                                         steps_per_epoch=len(self.loader))
        self.epoch, self.best = 0, {"val_robust_acc": -math.inf, "epoch": 0}
        self._partial: dict | None = None  # the unfinished epoch of a mid-epoch last.pt
        self._stop_signal: int | None = None  # SIGTERM / SIGUSR1 received (see fit)
        self._last_save = time.time()
        if resume:
            self._restore()
        self.log = None
        if self.main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / PREEMPTED_MARKER).unlink(missing_ok=True)
                dump_config(cfg, self.out / "config.yaml", git=git_state(),
                            command=" ".join(sys.argv), world_size=self.world)
            except OSError as err:  # a read-only or otherwise unwritable place
                raise RunError(f"cannot write to out_dir {self.out} ({err.strerror or err}); "
                               f"choose another out_dir") from None
            self.log = RunLog(self.out, cfg, resume_epoch=self.epoch)

    def _build_data(self, splits: datasets.Splits | None) -> int:
        """self.splits (data.Splits tensors, or data.FolderSplits file lists), self.loader
        (training batches) and self.eval_sets ({"val": None when there is no validation split,
        "test"}); returns the number of classes."""
        cfg, dcfg = self.cfg, self.cfg["data"]
        self.sampler = torch.Generator().manual_seed(cfg["seed"])
        common = dict(generator=self.sampler, drop_last=dcfg["drop_last"], device=self.device,
                      rank=self.rank, world_size=self.world)
        if splits is None and dcfg["name"] in datasets.FOLDER_DATASETS:
            files = self.splits = datasets.load_folder_splits(
                dcfg["name"], dcfg["root"], dcfg["lists"], dcfg["val_size"],
                dcfg["num_classes"] or datasets.NUM_CLASSES[dcfg["name"]])
            sizes = dict(image_size=dcfg["image_size"], resize_size=dcfg["resize_size"])
            self.loader = datasets.FolderTrainLoader(
                files.train, cfg["optim"]["batch_size"], augment=dcfg["augment"],
                workers=dcfg["workers"], **sizes, **common)
            self.eval_sets = {
                name: None if part is None else
                datasets.FolderEvalSet(part, workers=dcfg["workers"], **sizes)
                for name, part in (("val", files.val), ("test", files.test))}
            return files.num_classes
        splits = self.splits = splits or datasets.load_splits(
            dcfg["name"], root=dcfg["root"], val_size=dcfg["val_size"], download=dcfg["download"])
        gcfg = dcfg["generated"]
        generated = GeneratedSet(gcfg["path"], splits.num_classes) if gcfg["path"] else None
        self.loader = datasets.TrainLoader(
            splits.train_x, splits.train_y, cfg["optim"]["batch_size"], augment=dcfg["augment"],
            second_view=dcfg["second_view"], generated=generated, fraction=gcfg["fraction"],
            # An epoch with generated data: as many batches as the official training set fills
            # (50,000 CIFAR images, validation included), as Wang et al.
            epoch_size=len(splits.train_y) + len(splits.val_y), **common)
        self.eval_sets = {
            "val": datasets.TensorEvalSet(splits.val_x, splits.val_y) if len(splits.val_y)
            else None,
            "test": datasets.TensorEvalSet(splits.test_x, splits.test_y)}
        return splits.num_classes

    # ---- run directory and resume -------------------------------------------------------------
    def _check_out_dir(self, resume: bool) -> bool:
        """Whether there is a checkpoint to resume; refuses to write over another run."""
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"out_dir {self.out} is a file, not a directory; choose another "
                           f"out_dir")
        if resume and ((self.out / "last.pt").exists()
                       or (self.out / PREVIOUS_CHECKPOINT).exists()):  # last.pt moved aside
            return True
        present = sorted(p.name for p in self.out.iterdir()) if self.out.is_dir() else []
        if not resume:
            if present and not set(present) - PRE_CHECKPOINT_FILES:
                raise RunError(f"out_dir {self.out} holds a run that stopped before its first "
                               f"checkpoint; pass --resume to start it again there, or remove "
                               f"the directory")
            if present:
                raise RunError(f"out_dir {self.out} exists and is not empty; pass --resume to "
                               f"continue it or choose another out_dir")
            return False
        if not self.out.is_dir() or set(present) - PRE_CHECKPOINT_FILES:
            raise RunError(f"--resume: no last.pt in {self.out}")
        print(f"at.train: {self.out} has no last.pt (the run stopped in its first epoch); "
              f"starting from epoch 1", file=sys.stderr)
        return False

    def _restore(self) -> None:
        path = self.out / "last.pt"
        try:
            state = ckpt.load(path, map_location=self.device)
        except ckpt.CheckpointError as err:
            # A file damaged after it was written (a disk or copy error: our own writes are
            # atomic) costs one epoch, not the run: the previous epoch's checkpoint is kept.
            previous = self.out / PREVIOUS_CHECKPOINT
            if not previous.exists():
                raise
            state = ckpt.load(previous, map_location=self.device)
            aside = ""
            if self.main and path.exists():
                # The next save would rotate the unreadable last.pt into last_prev.pt and so
                # discard the only good fallback: keep it out of the rotation (and for a look).
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                corrupt = path.with_name(f"{path.name}.corrupt-{stamp}")
                path.rename(corrupt)
                aside = f" (moved aside to {corrupt})"
            print(f"at.train: {err}{aside}; resuming from {previous} (epoch {state['epoch']}) "
                  f"instead", file=sys.stderr)
            path = previous
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"{path} has format {state.get('format')}, "
                           f"expected {CHECKPOINT_FORMAT}")
        changed = _config_changes(state["config"], self.cfg)
        if self.cfg["optim"]["epochs"] < state["epoch"]:
            # config.yaml would record fewer epochs than the checkpoints hold.
            raise RunError(f"--resume with optim.epochs={self.cfg['optim']['epochs']}, but "
                           f"{path} has already done {state['epoch']} epochs")
        if changed:
            raise RunError(f"--resume with a config that differs from the run's in: "
                           f"{', '.join(changed)}")
        ckpt.load_model_state(self.model, state["model"], str(path))
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        match_state_layout(self.optimizer)  # a checkpoint of another speed.channels_last
        if self.avg is not None:
            self.avg.load_state_dict(state["avg"])
        self.epoch, self.best = state["epoch"], state["best"]
        partial = state.get("partial")
        if partial is None:
            self.loader.load_state_dict(state["loader"])
            return
        # Inside an epoch: this rank's generators as they were, or, on another number of
        # ranks, fresh streams (then augmentation and attack starts differ from an uninterrupted
        # run from here on; data order, weights, optimizer and statistics do not).
        same_world = len(partial["ranks"]) == self.world
        if same_world:
            mine = partial["ranks"][self.rank]
            # This rank's own buffers: BatchNorm running statistics drift apart between ranks
            # within an epoch (the attack uses them) and method accumulators hold its share.
            self._load_buffers(mine["buffers"])
        else:
            epoch, step = self.epoch + 1, partial["step"]
            fresh = torch.Generator().manual_seed(
                datasets.derived_seed(self.cfg["seed"], epoch, self.rank, 2, step))
            mine = {"augmenter": fresh.get_state(), "rng": None, "sums": {}, "seen": 0}
            if self.main:  # the statistics so far, all ranks' together
                for other in partial["ranks"]:
                    for k, v in other["sums"].items():
                        mine["sums"][k] = mine["sums"].get(k, 0.0) + v
                    mine["seen"] += other["seen"]
            with torch.no_grad():  # the method's epoch accumulators, likewise
                for name in self.method.accumulators:
                    buf = self.method.get_buffer(name)
                    buf.zero_()
                    if self.main:
                        for other in partial["ranks"]:
                            buf += other["buffers"][f"method.{name}"].to(buf)
            reseeded = "attack starts" if isinstance(self.loader, datasets.FolderTrainLoader) \
                else "augmentation and attack starts"
            print(f"at.train: resuming inside epoch {epoch} on {self.world} processes "
                  f"(saved on {len(partial['ranks'])}): the rest of this epoch's {reseeded} "
                  f"are freshly seeded", file=sys.stderr)
        self.loader.load_state_dict(state["loader"], augmenter=mine["augmenter"])
        self._partial = {**partial, **mine}

    def _load_buffers(self, buffers: dict) -> None:
        with torch.no_grad():
            for prefix, module in (("model", self.model), ("method", self.method)):
                for name, b in module.named_buffers():
                    b.copy_(buffers[f"{prefix}.{name}"])

    def _state(self) -> dict:
        """Everything --resume needs (at an epoch end, or with `partial` added inside one)."""
        state = {"format": CHECKPOINT_FORMAT, "epoch": self.epoch, "config": self.cfg,
                 "model": self.model.state_dict(), "method": self.method.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "loader": self.loader.state_dict(),
                 "best": self.best, "world_size": self.world}
        if self.avg is not None:
            state["avg"] = self.avg.state_dict()
        return state

    def _write(self, obj: dict, name: str) -> None:
        """Atomic write into the run directory; a full disk is a one-line error and leaves the
        previous file as it was (the temporary file is removed)."""
        path = self.out / name
        bad = ckpt.first_nonfinite(obj)
        if bad is not None:  # a checkpoint of a diverged run would resume or evaluate garbage
            raise NonFiniteLoss(f"{bad} holds NaN/inf at epoch {self.epoch}: refusing to write "
                                f"{path}; the previous {name} is intact")
        try:
            if name == "last.pt" and path.exists():
                # keep the previous checkpoint as a fallback (see _restore)
                ckpt.keep_copy(path, self.out / PREVIOUS_CHECKPOINT)
            ckpt.atomic_save(obj, path)
        except OSError as err:
            why = "disk full" if err.errno == errno.ENOSPC else err.strerror or str(err)
            raise RunError(f"could not write {path} ({why}); the previous {name} is intact"
                           ) from None
        if name == "last.pt":
            self._last_save = time.time()

    def _save_partial(self, step: int, sums: dict, seen: int, skipped: int,
                      seconds: float) -> None:
        """last.pt inside epoch self.epoch, after its `step`-th batch (every rank calls this)."""
        loader = self.loader.state_dict()
        mine = {"augmenter": loader.get("augmenter"), "rng": ckpt.rng_state(self.device),
                "sums": {k: v.item() for k, v in sums.items()}, "seen": seen,
                "buffers": {f"{prefix}.{name}": b.detach().cpu().clone()
                            for prefix, module in (("model", self.model), ("method", self.method))
                            for name, b in module.named_buffers()}}
        ranks = distributed.gather_objects(mine)
        if self.main:
            state = self._state()
            state["epoch"] = self.epoch - 1  # completed epochs
            state["loader"] = loader
            state["partial"] = {"step": step, "skipped": skipped, "seconds": seconds,
                                "ranks": ranks}
            self._write(state, "last.pt")
        distributed.barrier()
        self._last_save = time.time()

    def _save(self, record: dict) -> None:
        state = self._state()
        state["metrics"] = record
        # eval.best_on=avg selects on the averaged weights' validation accuracy (Wang et al.).
        key = "avg_val_robust_acc" if self.cfg["eval"]["best_on"] == "avg" else "val_robust_acc"
        improved = record.get(key) is not None and record[key] > self.best["val_robust_acc"]
        if improved:
            self.best = {"val_robust_acc": record[key], "epoch": self.epoch}
            state["best"] = self.best
            best = {"format": CHECKPOINT_FORMAT, "epoch": self.epoch, "config": self.cfg,
                    "model": state["model"], "metrics": record}
            if self.avg is not None:
                best["avg"] = state["avg"]
            self._write(best, "best.pt")
        self._write(state, "last.pt")

    # ---- one epoch ----------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        cfg, model, method = self.cfg, self.model, self.method
        partial, self._partial = self._partial, None
        if partial is None:
            # The attack's random starts: a stream per (epoch, rank), so that a run resumed at
            # an epoch boundary (on any number of ranks) draws what an uninterrupted one draws.
            torch.manual_seed(datasets.derived_seed(cfg["seed"], self.epoch, self.rank, 1))
        elif partial["rng"] is not None:
            ckpt.set_rng_state(partial["rng"], self.device)
        else:
            torch.manual_seed(datasets.derived_seed(cfg["seed"], self.epoch, self.rank, 1,
                                                    partial["step"]))
        lr = lr_at(cfg["optim"], self.epoch)
        momentum = momentum_at(cfg["optim"], self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"], group["momentum"] = lr, momentum
        budget = attack_budget(cfg["attack"], self.epoch, cfg["optim"]["epochs"])
        interval = cfg["log"]["interval"]
        # Running sums stay on the device; the host reads them once per log interval.
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        sums: dict[str, torch.Tensor] = {}
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        seen, skipped, first, before = 0, 0, 0, 0.0
        if partial is not None:
            sums = {k: zero + v for k, v in partial["sums"].items()}
            seen, skipped = partial["seen"], partial["skipped"]
            first, before = partial["step"], partial["seconds"]
        limit = cfg["train"]["skip_nonfinite"]
        every = cfg["checkpoint"]["every_minutes"] * 60.0
        bar = Progress(total=len(self.loader), initial=first, desc=f"epoch {self.epoch}",
                       enabled=self.main, every=cfg["log"]["progress_minutes"] * 60.0)
        start = time.time()
        awp = self.awp if self.awp is not None and self.awp.active(self.epoch) else None
        views = self.loader.views
        # A skipped step must leave no trace: its train-mode forwards have already moved the
        # BatchNorm running statistics (of the model and of a method's own networks), so every
        # buffer is copied before the step and put back when it is skipped.
        buffers = [b for m in (model, method) for b in m.buffers()] if limit else []
        saved = [torch.empty_like(b) for b in buffers]
        # More skipped steps than this share of an epoch is a diverged run, whatever
        # train.skip_nonfinite allows: its checkpoints would hold a model that learned nothing.
        max_skipped = min(limit, int(len(self.loader) * MAX_SKIPPED_SHARE))
        bn_first = cfg["model"]["bn_first_momentum"]
        for step, (x, y) in enumerate(self.loader, start=first + 1):
            if buffers:
                torch._foreach_copy_(saved, buffers)
            very_first = bn_first is not None and self.epoch == 1 and step == 1
            if very_first:  # Wang et al.: the running statistics start as this batch's
                set_bn_momentum(model, bn_first)
            out, loss = self._forward_backward(x, y, budget, awp, views)
            if very_first:
                set_bn_momentum(model, cfg["model"]["bn_momentum"])
            if limit and distributed.all_max(int(not torch.isfinite(loss).item())):
                # train.skip_nonfinite: no update from this batch (one host sync per step).
                skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                if awp is not None:
                    awp.restore()
                if buffers:
                    torch._foreach_copy_(buffers, saved)
                if skipped > max_skipped:
                    raise NonFiniteLoss(
                        f"non-finite training loss at epoch {self.epoch}, step {step}: more than "
                        f"{max_skipped} such steps (train.skip_nonfinite={limit}, at most "
                        f"{MAX_SKIPPED_SHARE:.0%} of the epoch's {len(self.loader)} steps); "
                        f"stopped without saving")
                if self.main:
                    print(f"at.train: warning: non-finite loss at epoch {self.epoch}, step "
                          f"{step}: step skipped ({skipped} of {max_skipped} allowed)",
                          file=sys.stderr)
                bar.update(1)
                continue
            self.optimizer.step()
            if awp is not None:
                awp.restore()  # after the step, as in the reference: wd acts at w + v
            if self.avg is not None:  # sees the real (unperturbed) weights
                self.avg.update_step(model, (self.epoch - 1) * len(self.loader) + step)
            method.observe(y, out)

            n = len(y)
            seen += n
            batch = {"loss": loss, **{f"loss_{k}": v for k, v in out.terms.items()}}
            for key, value in batch.items():
                sums[key] = sums.get(key, zero) + value.detach().double() * n
            for key, logits in (("train_adv_acc", out.logits_adv),
                                ("train_clean_acc", out.logits_clean)):
                if logits is not None:
                    sums[key] = sums.get(key, zero) + (logits.argmax(1) == y).sum()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss),
                                    torch.full_like(first_bad, step), first_bad)
            bar.update(1)
            if step % interval == 0 or step == len(self.loader):
                self._check_finite(first_bad)
                bar.set_postfix(loss=f"{sums['loss'].item() / seen:.4f}")
            # A mid-epoch checkpoint when one is due or a preemption signal arrived; the
            # decision is the same on every rank (one tiny host-side all-reduce per step under
            # torchrun, on gloo: it does not wait for the GPU).
            # (After the last step the epoch-end checkpoint follows anyway.)
            due = 2 if self._stop_signal is not None else \
                int(every > 0 and step < len(self.loader)
                    and time.time() - self._last_save >= every)
            due = distributed.all_max(due)
            if due:
                self._check_finite(first_bad)  # never checkpoint a diverged model
                self._save_partial(step, sums, seen, skipped, before + time.time() - start)
                if due == 2:
                    self._preempted(f"saved {self.out / 'last.pt'} at epoch {self.epoch}, "
                                    f"step {step} of {len(self.loader)}")
        bar.close()
        method.on_epoch_end()  # sums its statistics over ranks (the IKL-AT prior)
        # BatchNorm running statistics drift apart between ranks unless synchronised: rank 0's
        # are the ones saved, so every rank validates and averages with them.
        distributed.broadcast_buffers(model, method)
        if self.avg is not None:
            self.avg.update_epoch(model, self.epoch)
        seconds = before + time.time() - start
        keys = sorted(sums)
        totals = distributed.all_reduce_sum_(
            torch.stack([sums[k] for k in keys] + [zero + seen])).tolist()
        seen = totals[-1]
        stats = {k: v / seen * (100.0 if k.endswith("_acc") else 1.0)
                 for k, v in zip(keys, totals)}
        record = {"epoch": self.epoch, "lr": lr, "eps": budget.eps, "attack_steps":
                  budget.steps if method.uses_attack else 0, **stats, "train_seconds": seconds,
                  "images_per_s": seen / seconds}
        if skipped:
            record["skipped_steps"] = skipped
        return record

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, budget, awp: AWP | None,
                          views: int) -> tuple:
        """Attack, AWP and the outer pass of one step, leaving the gradients in .grad (no host
        synchronisation). Returns the method's StepOutput and the unscaled loss."""
        method, model, device = self.method, self.model, self.device
        x = speed.to_memory_format(x, self.speed)
        # DDP averages the ranks' gradients; a rank holding n of the global batch's N images
        # weighs its batch-mean loss by n * world / N, so that the average is the gradient of
        # the global batch mean even when N does not split evenly.
        scale = len(y) // views * self.world / self.loader.global_size
        with speed.autocast(device, self.speed["attack_precision"]):
            x_adv = method.perturb(model, x, y, budget)  # at the unperturbed weights
        with speed.autocast(device, self.speed["update_precision"]):
            if awp is not None:
                awp.perturb(lambda: method.awp_loss(model, x, y, x_adv, views) * scale)
            out = self.objective(x, y, x_adv, views)
        loss = out.total()
        self.optimizer.zero_grad(set_to_none=True)
        (loss if scale == 1 else loss * scale).backward()
        return out, loss

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad = distributed.all_max(int(first_bad.item()))
        if bad >= 0:
            raise NonFiniteLoss(f"non-finite training loss at epoch {self.epoch}, step {bad}; "
                                f"stopped without saving (last.pt still holds epoch "
                                f"{self.epoch - 1})")

    def validate(self, final: bool, model: torch.nn.Module | None = None) -> dict:
        ecfg, acfg = self.cfg["eval"], self.cfg["attack"]
        pgd = dict(eps=acfg["eps"], steps=ecfg["pgd_steps"], step_size=ecfg["pgd_step_size"],
                   norm=acfg["norm"], seed=self.cfg["seed"])
        start = time.time()
        record: dict = {}
        val, test = self.eval_sets["val"], self.eval_sets["test"]
        if val is not None and (final or self.epoch % ecfg["every"] == 0):
            record["val_clean_acc"] = self._acc(val, model)
            # PGD-0 is the clean accuracy: no second pass (an ImageNet validation set is large).
            record["val_robust_acc"] = (self._acc(val, model, **pgd) if ecfg["pgd_steps"] > 0
                                        else record["val_clean_acc"])
        record["test_clean_acc"] = self._acc(test, model, n=ecfg["n_test"])
        record["eval_seconds"] = time.time() - start
        return record

    def _acc(self, dataset, model: torch.nn.Module | None = None, n: int | None = None,
             **pgd) -> float:
        """Accuracy in percent on the first `n` images (all when None) of an evaluation set
        (data.TensorEvalSet / FolderEvalSet); with several ranks each evaluates a contiguous
        shard."""
        hits, counts = self._class_hits(dataset, model, n, **pgd)
        total = counts.sum().item()
        return 100.0 * hits.sum().item() / total if total else float("nan")

    def _class_hits(self, dataset, model: torch.nn.Module | None = None, n: int | None = None,
                    **pgd) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class: correct predictions and images (float64, length C), summed over ranks."""
        model = self.model if model is None else model
        n = len(dataset) if n is None else min(n, len(dataset))
        rows = None
        if self.world > 1 or n < len(dataset):
            rows = torch.tensor_split(torch.arange(n), self.world)[self.rank]
        labels = []

        def tap(batches):
            for xb, yb in batches:
                labels.append(yb)
                yield xb, yb

        flags = correct_batches(
            model, tap(dataset.batches(self.cfg["eval"]["batch_size"], self.device, rows)), **pgd)
        y = torch.cat(labels).cpu() if labels else torch.zeros(0, dtype=torch.int64)
        table = torch.zeros(2, self.num_classes, dtype=torch.float64)
        table[0].index_add_(0, y, flags.double())
        table[1].index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
        table = distributed.all_reduce_sum_(table.to(self.device)).cpu()
        return table[0], table[1]

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        epochs = self.cfg["optim"]["epochs"]
        previous = {}
        if threading.current_thread() is threading.main_thread():
            # Cluster preemption: note the signal; the loop saves at the next step and stops.
            # A first Ctrl-C does the same (no work lost; see _on_signal for the second).
            for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            while self.epoch < epochs:
                self.epoch += 1
                record = self.train_epoch()
                record.update(self.validate(final=self.epoch == epochs))
                if self.avg is not None and self.avg.ready:
                    avg = self.validate(final=self.epoch == epochs, model=self.avg.module)
                    record.update({f"avg_{k}": v for k, v in avg.items()})
                if self.main:
                    self.log.append(record)
                    self._save(record)
                    print(_summary(record, epochs), flush=True)
                distributed.barrier()  # best.pt is on disk before any rank reads it
                self._last_save = time.time()
                if distributed.all_max(int(self._stop_signal is not None)):
                    self._preempted(f"saved {self.out / 'last.pt'} at the end of epoch "
                                    f"{self.epoch}")
            return self.finish()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.log is not None:
                self.log.close()

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        if signum == signal.SIGINT:
            # A second Ctrl-C aborts at once (KeyboardInterrupt; at.train exits 130).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.main:
                print("at.train: interrupted; saving last.pt at the next step (Ctrl-C again to "
                      "abort without saving)", file=sys.stderr, flush=True)

    def _preempted(self, message: str) -> None:
        """Stop after a signal: PREEMPTED_MARKER tells a job script to requeue (and only this
        stop: a requeued error would fail forever); --resume removes it."""
        # Ctrl-C is the user's own stop, not a preemption: no requeue marker.
        if self.main and self._stop_signal != signal.SIGINT:
            text = json.dumps({"signal": self._stop_signal, "message": message}) + "\n"
            ckpt.atomic_write(self.out / PREEMPTED_MARKER, lambda f: f.write(text.encode()))
        raise Preempted(message, self._stop_signal)

    def finish(self) -> dict:
        """Test clean and PGD accuracy of the last, best and averaged weights -> final.json."""
        ecfg, acfg = self.cfg["eval"], self.cfg["attack"]
        candidates = [("last", self.epoch, self.model)]
        if (self.out / "best.pt").exists():
            best = ckpt.load(self.out / "best.pt", map_location=self.device)
            best_model = copy.deepcopy(self.model)
            if self.cfg["eval"]["best_on"] == "avg":  # the averaged weights were selected
                best_model.load_state_dict(best["avg"]["model"])
            else:
                best_model.load_state_dict(best["model"])
            candidates.append(("best", best["epoch"], best_model))
        if self.avg is not None and self.avg.ready:
            candidates.append(("avg", self.epoch, self.avg.module))
        result = {}
        for name, epoch, model in candidates:
            test = self.eval_sets["test"]
            hits, counts = self._class_hits(test, model)
            total = counts.sum().item()
            row = {"epoch": epoch,
                   "test_clean_acc": 100.0 * hits.sum().item() / total if total else math.nan}
            if self.train_counts is not None:  # a long-tailed training set: accuracy per shot
                row.update({f"test_{k}_acc": v for k, v in
                            shot_accuracies(hits, counts, self.train_counts).items()})
            if ecfg["final_pgd"]:
                row["test_robust_acc"] = self._acc(
                    test, model, eps=acfg["eps"],
                    steps=ecfg["pgd_steps"], step_size=ecfg["pgd_step_size"], norm=acfg["norm"],
                    seed=self.cfg["seed"])
                # What the number means, for readers of final.json alone (eval.summary).
                row.update(pgd_steps=ecfg["pgd_steps"], eps=acfg["eps"], norm=acfg["norm"],
                           n_test=int(total))
            result[name] = row
        if self.main:
            text = json.dumps(result, indent=2) + "\n"
            ckpt.atomic_write(self.out / "final.json", lambda f: f.write(text.encode()))
            print(_final_table(result, self.cfg), flush=True)
        return result


def _fmt(value) -> str:
    return "   -  " if value is None else f"{value:6.2f}"


def _summary(r: dict, epochs: int) -> str:
    losses = " ".join(f"{k[5:] or 'total'} {v:.4f}" for k, v in r.items() if k.startswith("loss"))
    train_acc = r.get("train_adv_acc", r.get("train_clean_acc"))
    return (f"epoch {r['epoch']:>3}/{epochs}  lr {r['lr']:.4f}  eps {r['eps'] * 255:.2f}/255 "
            f"x{r['attack_steps']}  {losses}  train {'adv' if 'train_adv_acc' in r else 'clean'} "
            f"{_fmt(train_acc)}  val clean "
            f"{_fmt(r.get('val_clean_acc'))} pgd {_fmt(r.get('val_robust_acc'))}  test clean "
            f"{_fmt(r.get('test_clean_acc'))}  {r['train_seconds']:.0f}s+{r['eval_seconds']:.0f}s")


def _final_table(result: dict, cfg: dict) -> str:
    steps = cfg["eval"]["pgd_steps"]
    eps = cfg["attack"]["eps"] * 255
    lines = [f"final test accuracy (%), PGD-{steps} at eps {eps:.4g}/255 ({cfg['attack']['norm']})",
             f"{'weights':<10}{'epoch':>6}{'clean':>9}{'PGD':>9}"]
    for name, row in result.items():
        lines.append(f"{name:<10}{row['epoch']:>6}{_fmt(row['test_clean_acc']):>9}"
                     f"{_fmt(row.get('test_robust_acc')):>9}")
    return "\n".join(lines)


def fit(cfg: dict, *, resume: bool = False) -> dict:
    """Train according to `cfg` (see configs/base.yaml); returns the final test accuracies."""
    return Trainer(cfg, resume=resume).fit()
