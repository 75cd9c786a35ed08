"""The one training loop for every method: data -> model -> method -> epochs -> run directory.

Run directory (at/run_dir.py): config.yaml (resolved config + git state), metrics.jsonl (one
record per epoch), curves.png, last.pt (everything needed to continue), best.pt (best validation
PGD accuracy) and final.json (test clean / PGD accuracy of the best and last weights).

Under torchrun every rank runs this loop on its share of each global batch (optim.batch_size is
the global batch); the outer loss goes through DistributedDataParallel, statistics and validation
are summed over ranks, and only rank 0 writes the run directory (at/distributed.py).
"""
from __future__ import annotations

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
from data.training import build_training_data
from errors import NonFiniteLoss, Preempted, RunError
from models.bn import set_bn_groups, set_bn_momentum

from . import averaging, distributed, run_dir, speed, stop_signal, sync_bn
from . import checkpoint as ckpt
from .awp import AWP
from .co_guard import COGuard
from .early_stop import EarlyStop
from .epoch_stats import EpochStats
from .grad_align import GradAlign
from .methods import Method, build_method
from .optim import build_optimizer
from .progress import Progress
from .run_log import RunLog, epoch_line, final_table, require_wandb
from .schedules import attack_budget, lr_at, momentum_at
from .validation import Evaluator

MAX_SKIPPED_SHARE = 0.5  # train.skip_nonfinite never skips more than this share of an epoch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device={name} requested but CUDA is not available")
    return torch.device(name)


class _Objective(nn.Module):
    """The outer loss as one module call, so that DistributedDataParallel sees the model and the
    method's own modules (LBGAT's natural model) in one forward and averages all their gradients."""

    def __init__(self, model: nn.Module, method: Method, grad_align: GradAlign | None = None):
        super().__init__()
        self.model, self.method, self.grad_align = model, method, grad_align

    def forward(self, x, y, x_adv):
        out = self.method.loss(self.model, x, y, x_adv)
        if self.grad_align is not None:  # method.grad_align (at/grad_align.py)
            out.terms["grad_align"] = self.grad_align(self.model, x, y)
        return out


class Trainer:
    def __init__(self, cfg: dict, *, resume: bool = False,
                 splits: datasets.Splits | None = None):
        """`cfg`: a config from load_config (which checked it); `splits`: data to train on
        instead of loading `data.name` (benchmarks); the config still decides everything else."""
        self._lock, self._created = None, False
        try:
            self._build(cfg, resume, splits)
        except BaseException:  # the run directory is free (or gone) for the next attempt
            if self._lock is not None:
                run_dir.release(self.out, self._lock, self._created)
            raise

    def _build(self, cfg: dict, resume: bool, splits: datasets.Splits | None) -> None:
        self.early_stop = EarlyStop.from_config(cfg)
        self.cfg, self.out = cfg, Path(cfg["out_dir"])
        if distributed.launched():
            self.device = distributed.init(cfg["device"])
        else:
            self.device = resolve_device(cfg["device"])
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        # Rank 0 inspects the run directory (the others would see the files it writes next).
        # It holds the directory's writer lock until fit() ends (at/lock.py).
        verdict = None
        if self.main:
            try:
                self._lock, found, self._created = run_dir.claim(self.out, resume)
                verdict = ("resume" if found else "new", None)
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

        data = build_training_data(cfg, self.device, self.rank, self.world, splits)
        self.splits, self.loader, self.num_classes = data.splits, data.loader, data.num_classes
        self.evaluator = Evaluator(cfg, data.eval_sets, data.num_classes, self.device, self.rank,
                                   self.world, data.class_counts)
        dcfg = cfg["data"]
        self.model = models.build_model(cfg["model"]["name"], self.num_classes,
                                        dataset=dcfg["name"],
                                        bn_momentum=cfg["model"]["bn_momentum"]).to(self.device)
        self.method: Method = build_method(cfg["method"], self.num_classes,
                                           self.loader.views).to(self.device)
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
        lam = cfg["method"]["grad_align"]
        self.grad_align = GradAlign(lam) if lam > 0 else None
        objective = _Objective(self.model, self.method, self.grad_align)
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
        self._stop_signal: int | None = None  # SIGTERM / SIGUSR1 received (see fit)
        self._last_save = time.time()
        self.guard = COGuard(cfg, data.eval_sets["val"], self.num_classes, self.device) \
            if cfg["train"]["co_guard"]["enabled"] else None  # train.co_guard (at/co_guard.py)
        self.state = run_dir.restore(self) if resume else run_dir.RunState()
        self.log = None
        if self.main:
            run_dir.open_run_dir(self.out, cfg, self.world)
            self.log = RunLog(self.out, cfg, resume_epoch=self.epoch)

    @property
    def epoch(self) -> int:
        """The epoch in progress (the completed ones between epochs)."""
        return self.state.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.state.epoch = value

    # ---- one epoch ----------------------------------------------------------------------------
    def _start_epoch(self, partial: dict | None):
        """Seeds the attack's random starts and sets this epoch's lr and momentum; returns the
        attack budget."""
        cfg = self.cfg
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
        if self.guard is not None:
            budget = self.guard.adjust(budget)  # its actions so far
        if self.grad_align is not None:
            self.grad_align.eps = budget.eps
        return budget

    def train_epoch(self) -> dict:
        cfg, model, method, steps = self.cfg, self.model, self.method, len(self.loader)
        partial, self.state.partial = self.state.partial, None
        budget = self._start_epoch(partial)
        stats = EpochStats(self.device)  # running sums on the device; partial: those so far
        skipped, first, before = 0, 0, 0.0
        if partial is not None:
            stats = EpochStats(self.device, partial["sums"], partial["seen"])
            skipped, first, before = partial["skipped"], partial["step"], partial["seconds"]
        guard, collapse = self.guard, None
        if guard is not None:
            guard.start_epoch(self, partial, first, skipped, before)
        interval, limit = cfg["log"]["interval"], cfg["train"]["skip_nonfinite"]
        every = cfg["checkpoint"]["every_minutes"] * 60.0
        bar = Progress(total=steps, initial=first, desc=f"epoch {self.epoch}", enabled=self.main,
                       every=cfg["log"]["progress_minutes"] * 60.0)
        start = time.time()
        awp = self.awp if self.awp is not None and self.awp.active(self.epoch) else None
        # A skipped step must leave no trace: its train-mode forwards have already moved the
        # BatchNorm running statistics (of the model and of a method's own networks), so every
        # buffer is copied before the step and put back when it is skipped.
        buffers = [b for m in (model, method) for b in m.buffers()] if limit else []
        saved = [torch.empty_like(b) for b in buffers]
        # More skipped steps than this share of an epoch is a diverged run, whatever
        # train.skip_nonfinite allows: its checkpoints would hold a model that learned nothing.
        max_skipped = min(limit, int(steps * MAX_SKIPPED_SHARE))
        for step, (x, y) in enumerate(self.loader, start=first + 1):
            if buffers:
                torch._foreach_copy_(saved, buffers)
            out, loss = self._forward_backward(x, y, budget, awp,
                                               first_step=self.epoch == 1 and step == 1)
            if limit and distributed.all_max(int(not torch.isfinite(loss).item())):
                # train.skip_nonfinite: no update from this batch (one host sync per step).
                skipped += 1
                self._skip_step(awp, buffers, saved, skipped, max_skipped, step)
                bar.update(1)
                continue
            self.optimizer.step()
            if awp is not None:
                awp.restore()  # after the step, as in the reference: wd acts at w + v
            if self.avg is not None:  # sees the real (unperturbed) weights
                self.avg.update_step(model, (self.epoch - 1) * steps + step)
            method.observe(y, out)
            stats.add(step, y, loss, out)
            bar.update(1)
            if step % interval == 0 or step == steps:
                self._check_finite(stats)
                bar.set_postfix(loss=f"{stats.mean_loss():.4f}")
            if guard is not None and guard.due(step, steps):
                collapse = guard.check(self, step, stats, skipped, before + time.time() - start)
                if collapse is not None:
                    break
            # A mid-epoch checkpoint when one is due or a preemption signal arrived; the
            # decision is the same on every rank (one tiny host-side all-reduce per step under
            # torchrun, on gloo: it does not wait for the GPU).
            # (After the last step the epoch-end checkpoint follows anyway.)
            due = 2 if self._stop_signal is not None else \
                int(every > 0 and step < steps and time.time() - self._last_save >= every)
            due = distributed.all_max(due)
            if due:
                self._check_finite(stats)  # never checkpoint a diverged model
                run_dir.save_partial(self, step, stats.host_sums(), stats.seen, skipped,
                                     before + time.time() - start)
                self._last_save = time.time()
                if due == 2:
                    self._preempted(f"saved {self.out / 'last.pt'} at epoch {self.epoch}, "
                                    f"step {step} of {steps}")
        bar.close()
        if collapse is not None:  # back to the last good check, then the configured action
            guard.recover(self, collapse, attack_budget(cfg["attack"], self.epoch,
                                                        cfg["optim"]["epochs"]))
            return None if guard.stopped else self.train_epoch()
        return self._end_epoch(stats, budget, skipped, start - before)

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, budget, awp: AWP | None,
                          first_step: bool = False) -> tuple:
        """Attack, AWP and the outer pass of one step, leaving the gradients in .grad (no host
        synchronisation). Returns the method's StepOutput and the unscaled loss."""
        method, model, device = self.method, self.model, self.device
        bn_first = self.cfg["model"]["bn_first_momentum"]
        if first_step and bn_first is not None:
            set_bn_momentum(model, bn_first)  # Wang et al.: running statistics = this batch's
        x = speed.to_memory_format(x, self.speed)
        # DDP averages the ranks' gradients; a rank holding n of the global batch's N images
        # weighs its batch-mean loss by n * world / N, so that the average is the gradient of
        # the global batch mean even when N does not split evenly.
        scale = len(y) // method.views * self.world / self.loader.global_size
        with speed.autocast(device, self.speed["attack_precision"]):
            x_adv = method.perturb(model, x, y, budget)  # at the unperturbed weights
        with speed.autocast(device, self.speed["update_precision"]):
            if awp is not None:
                awp.perturb(lambda: method.awp_loss(model, x, y, x_adv) * scale)
            out = self.objective(x, y, x_adv)
        loss = out.total()
        self.optimizer.zero_grad(set_to_none=True)
        (loss if scale == 1 else loss * scale).backward()
        if first_step and bn_first is not None:
            set_bn_momentum(model, self.cfg["model"]["bn_momentum"])
        return out, loss

    def _skip_step(self, awp: AWP | None, buffers: list, saved: list, skipped: int,
                   max_skipped: int, step: int) -> None:
        """train.skip_nonfinite: undo a step whose loss is not finite, or stop past the limit."""
        self.optimizer.zero_grad(set_to_none=True)
        if awp is not None:
            awp.restore()
        if buffers:
            torch._foreach_copy_(buffers, saved)
        if skipped > max_skipped:
            raise NonFiniteLoss(
                f"non-finite training loss at epoch {self.epoch}, step {step}: more than "
                f"{max_skipped} such steps (train.skip_nonfinite="
                f"{self.cfg['train']['skip_nonfinite']}, at most {MAX_SKIPPED_SHARE:.0%} of the "
                f"epoch's {len(self.loader)} steps); stopped without saving")
        if self.main:
            print(f"at.train: warning: non-finite loss at epoch {self.epoch}, step "
                  f"{step}: step skipped ({skipped} of {max_skipped} allowed)", file=sys.stderr)

    def _check_finite(self, stats: EpochStats) -> None:
        bad = stats.first_nonfinite_step()
        if bad >= 0:
            raise NonFiniteLoss(f"non-finite training loss at epoch {self.epoch}, step {bad}; "
                                f"stopped without saving (last.pt still holds epoch "
                                f"{self.epoch - 1})")

    def _end_epoch(self, stats: EpochStats, budget, skipped: int, start: float) -> dict:
        """Epoch-end statistics and buffers; the epoch's metrics record. `start`: when the
        epoch began (earlier when part of it ran before a resume)."""
        model, method = self.model, self.method
        method.on_epoch_end()  # sums its statistics over ranks (the IKL-AT prior)
        # BatchNorm running statistics drift apart between ranks unless synchronised: rank 0's
        # are the ones saved, so every rank validates and averages with them.
        distributed.broadcast_buffers(model, method)
        if self.avg is not None:
            self.avg.update_epoch(model, self.epoch)
        seconds = time.time() - start
        means, seen = stats.reduce()
        record = {"epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
                  "eps": budget.eps, "attack_steps": budget.steps if method.uses_attack else 0,
                  **means, "train_seconds": seconds, "images_per_s": seen / seconds}
        if skipped:
            record["skipped_steps"] = skipped
        if self.guard is not None:
            record["co_guard"] = self.guard.summary()
        return record

    def validate(self, final: bool, model: torch.nn.Module | None = None) -> dict:
        return self.evaluator.validate(self.model if model is None else model, self.epoch, final)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        epochs = self.cfg["optim"]["epochs"]
        previous = {}
        if threading.current_thread() is threading.main_thread():
            # Cluster preemption: note the signal; the loop saves at the next step and stops.
            # A first Ctrl-C does the same (no work lost; see _on_signal for the second).
            for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._on_signal)
            if stop_signal.received is not None:  # arrived before (at.train's first line on)
                self._stop_signal = stop_signal.received
        self.early_stop.restore(self.out / "metrics.jsonl", self.epoch)
        try:
            while self.epoch < epochs and not self.early_stop.stopped:
                self.epoch += 1
                record = self.train_epoch()
                if record is None:  # train.co_guard stopped the run inside this epoch
                    break
                record.update(self.validate(final=self.epoch == epochs))
                if self.avg is not None and self.avg.ready:
                    avg = self.validate(final=self.epoch == epochs, model=self.avg.module)
                    record.update({f"avg_{k}": v for k, v in avg.items()})
                stop = self.early_stop.observe(record)  # notes its counter in the record
                if self.main:
                    self.log.append(record)
                    run_dir.save(self, record, best=self._improved(record))
                    print(epoch_line(record, epochs), flush=True)
                distributed.barrier()  # best.pt is on disk before any rank reads it
                self._last_save = time.time()
                if distributed.all_max(int(self._stop_signal is not None)):
                    self._preempted(f"saved {self.out / 'last.pt'} at the end of epoch "
                                    f"{self.epoch}")
                if stop:
                    if self.main:
                        print(self.early_stop.message(), flush=True)
                    break
            return self.finish()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.log is not None:
                self.log.close()
            if self._lock is not None:
                self._lock.release()

    def _improved(self, record: dict) -> bool:
        """Whether this epoch's weights become best.pt: a higher validation PGD accuracy than
        every epoch before (of the averaged weights with eval.best_on=avg, Wang et al.)."""
        key = "avg_val_robust_acc" if self.cfg["eval"]["best_on"] == "avg" else "val_robust_acc"
        if record.get(key) is None or record[key] <= self.state.best["val_robust_acc"]:
            return False
        self.state.best = {"val_robust_acc": record[key], "epoch": self.epoch}
        return True

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        if signum == signal.SIGINT:
            # A second Ctrl-C aborts at once (KeyboardInterrupt; at.train exits 130).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.main:
                print("at.train: interrupted; saving last.pt at the next step (Ctrl-C again to "
                      "abort without saving)", file=sys.stderr, flush=True)

    def _preempted(self, message: str) -> None:
        """Stop after a signal, leaving the requeue marker (run_dir.mark_preempted)."""
        # Ctrl-C is the user's own stop, not a preemption: no requeue marker.
        if self.main and self._stop_signal != signal.SIGINT:
            run_dir.mark_preempted(self.out, self._stop_signal, message)
        raise Preempted(message, self._stop_signal)

    def finish(self) -> dict:
        """Test clean and PGD accuracy of the last, best and averaged weights, and the early
        stop's outcome and the CO guard's events when they were on -> final.json."""
        candidates = [("last", self.epoch, self.model)]
        if (self.out / "best.pt").exists():
            candidates.append(("best", *run_dir.load_best(self)))
        if self.avg is not None and self.avg.ready:
            candidates.append(("avg", self.epoch, self.avg.module))
        rows = self.evaluator.final(candidates)
        result = dict(rows)
        if self.early_stop.enabled:
            result["early_stop"] = self.early_stop.state()
        if self.guard is not None:  # every collapse event (at/co_guard.py)
            result["co_guard"] = self.guard.final_record()
        if self.main:
            ckpt.write_json(result, self.out / "final.json")
            print(final_table(rows, self.cfg), flush=True)
        return result


def fit(cfg: dict, *, resume: bool = False) -> dict:
    """Train according to `cfg` (see configs/base.yaml); returns the final test accuracies."""
    return Trainer(cfg, resume=resume).fit()
