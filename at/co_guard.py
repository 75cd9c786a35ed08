"""The catastrophic-overfitting guard (train.co_guard; docs/training.md#co-guard).

Single-step adversarial training can collapse within a few hundred steps: the PGD accuracy falls
to about zero while the accuracy under FGSM climbs (Wong et al. 2020; Andriushchenko & Flammarion
2020). Every `every` steps and at each epoch's last step the guard measures, on a fixed batch held
out from training (the first `batch` validation images), the accuracy under PGD-k (cross-entropy,
uniform start, radius attack.eps, step 2.5 eps / k) and under FGSM (one step of attack.eps from x,
no random start). A collapse is

    pgd < drop * best  (best: the highest PGD accuracy of a passed check, once >= 2 / classes)
    or  fgsm - pgd > gap.

A passed check stores the whole training state in memory (model, method, optimizer, averaging,
loader position, random generators, the epoch's statistics so far): the "last good state"; each
epoch also starts with one. On a collapse the trainer returns to it exactly and then applies
`action`: stop (the run ends; best.pt, chosen by validation as always, is intact), halve_step
(the inner attack's step is halved from there on; past MAX_HALVINGS it stops) or n_fgsm (the
inner attack becomes N-FGSM with the paper's step; a collapse under N-FGSM then stops). Every
event goes to metrics.jsonl (a line with "event": "co_guard"), to the console and to final.json.

The check runs in eval mode with its own seeded generator: a run whose checks all pass trains
exactly as without the guard. The guard's counters travel in every last.pt; a mid-epoch last.pt
also holds each rank's last good state, so that a resumed run rolls back as an uninterrupted one.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys

import torch
import torch.nn.functional as F

import data as datasets
from attacks import fgsm, frozen, pgd
from attacks.single_step import DEFAULT_STEP_FACTOR, SINGLE_STEP
from errors import ConfigError, RunError

from . import checkpoint as ckpt
from . import distributed
from .optim import match_state_layout

ACTIONS = ("stop", "halve_step", "n_fgsm")
# halve_step gives up (stops) after this many halvings: a step of 1/16 of the configured one
# that still collapses will not be rescued by a smaller one, and every retry costs training time.
MAX_HALVINGS = 4
# Methods whose inner attack has a single-step form (attacks.maximise on the method's objective).
SINGLE_STEP_METHODS = ("pgd_at", "trades", "ikl_at", "lbgat")


def check_config(cfg: dict) -> None:
    """train.co_guard at load time, before any data is read."""
    g, kind, method = cfg["train"]["co_guard"], cfg["attack"]["kind"], cfg["method"]["name"]
    if not g["enabled"]:
        return
    if kind not in SINGLE_STEP:
        raise ConfigError(f"train.co_guard guards single-step training; attack.kind={kind} has no "
                          f"single-step form (use one of {', '.join(SINGLE_STEP)})")
    if method not in SINGLE_STEP_METHODS:
        raise ConfigError(f"train.co_guard: method {method} has no single-step form (one of "
                          f"{', '.join(SINGLE_STEP_METHODS)})")
    checks = [
        (g["every"] >= 1, "train.co_guard.every must be >= 1"),
        (g["batch"] >= 1, "train.co_guard.batch must be >= 1"),
        (g["pgd_steps"] >= 1, "train.co_guard.pgd_steps must be >= 1"),
        (0 < g["drop"] <= 1, "train.co_guard.drop must be in (0, 1]"),
        (0 <= g["gap"] <= 1, "train.co_guard.gap must be in [0, 1]"),
        (g["action"] in ACTIONS, f"train.co_guard.action must be one of {', '.join(ACTIONS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    val = cfg["data"]["val_size"]
    if val is None and cfg["data"]["name"] == "imagenet_lt":
        return  # the official validation list: its size is known once read (COGuard checks)
    if not val or g["batch"] > val:
        raise ConfigError(f"train.co_guard.batch={g['batch']} is larger than the validation "
                          f"split (data.val_size={val}); the guard checks held-out images")


class COGuard:
    def __init__(self, cfg: dict, val_set, num_classes: int, device: torch.device):
        g = cfg["train"]["co_guard"]
        self.every, self.pgd_steps, self.action = g["every"], g["pgd_steps"], g["action"]
        self.drop, self.gap, self.floor = g["drop"], g["gap"], 2.0 / num_classes
        # PGD-k with Madry et al.'s step 2.5 eps / k, which can cross the ball from any start
        # whatever eps (2/255 for PGD-10 at 8/255, as eval.pgd_step_size).
        self.eps = cfg["attack"]["eps"]
        self.pgd_step = 2.5 * self.eps / self.pgd_steps
        self.k, self.seed, self.device = cfg["attack"]["n_fgsm_k"], cfg["seed"], device
        n = g["batch"]
        if val_set is None or len(val_set) < n:
            raise RunError(f"train.co_guard.batch={n} is larger than the validation split "
                           f"({0 if val_set is None else len(val_set)} images)")
        self.x, self.y = next(iter(val_set.batches(n, device, rows=torch.arange(n))))
        # Saved with every last.pt (state_dict):
        self.best: float | None = None  # highest PGD accuracy of a passed check
        self.events: list[dict] = []
        self.step_scale, self.kind, self.stopped = 1.0, None, False  # the actions' effect
        self.last: dict | None = None  # the latest check
        # This rank's last good state (in a mid-epoch last.pt only).
        self.snapshot: dict | None = None

    # ---- the attack the actions changed ------------------------------------------------------
    def adjust(self, budget):
        """The epoch's AttackBudget after the actions taken so far."""
        if self.kind is not None:
            budget = dataclasses.replace(budget, kind=self.kind, k=self.k,
                                         step_size=DEFAULT_STEP_FACTOR[self.kind] * budget.eps)
        return dataclasses.replace(budget, step_size=budget.step_size * self.step_scale)

    # ---- checks ------------------------------------------------------------------------------
    def due(self, step: int, steps: int) -> bool:
        return step % self.every == 0 or step == steps

    def measure(self, model: torch.nn.Module, epoch: int, step: int) -> tuple[float, float]:
        """(PGD accuracy, FGSM accuracy) on the held-out batch, fractions; eval mode, float32."""
        generator = torch.Generator(device=self.device).manual_seed(
            datasets.derived_seed(self.seed, epoch, step, 3))
        x, y = self.x, self.y
        with frozen(model):
            def ce(z):
                return F.cross_entropy(model(z), y, reduction="sum")
            x_pgd = pgd(ce, x, eps=self.eps, step_size=self.pgd_step, steps=self.pgd_steps,
                        init="uniform", generator=generator)
            x_fgsm = fgsm(ce, x, eps=self.eps, step_size=self.eps)
            with torch.no_grad():
                hits = torch.stack([(model(z).argmax(1) == y).double().mean()
                                    for z in (x_pgd, x_fgsm)]).tolist()
        return hits[0], hits[1]

    def collapse_reasons(self, pgd_acc: float, fgsm_acc: float) -> list[str]:
        """Why a check with these accuracies (fractions) is a collapse; [] when it is not."""
        reasons = []
        if self.best is not None and self.best >= self.floor and pgd_acc < self.drop * self.best:
            reasons.append(f"pgd accuracy {pgd_acc:.3f} < {self.drop} x best {self.best:.3f}")
        if fgsm_acc - pgd_acc > self.gap:
            reasons.append(f"fgsm - pgd accuracy {fgsm_acc - pgd_acc:.3f} > {self.gap}")
        return reasons

    def check(self, tr, step: int, stats, skipped: int, seconds: float) -> dict | None:
        """After optimizer step `step` of epoch tr.epoch: None when the check passes (the state is
        then stored as the last good one), else the collapse event (nothing restored yet)."""
        pgd_acc, fgsm_acc = distributed.broadcast_object(self.measure(tr.model, tr.epoch, step))
        self.last = {"epoch": tr.epoch, "step": step, "pgd_acc": pgd_acc, "fgsm_acc": fgsm_acc}
        reasons = self.collapse_reasons(pgd_acc, fgsm_acc)
        if not reasons:
            self.best = pgd_acc if self.best is None else max(self.best, pgd_acc)
            self.snapshot = self.take(tr, step, stats.host_sums(), stats.seen, skipped, seconds)
            return None
        return {"event": "co_guard", **self.last, "best_pgd_acc": self.best,
                "reason": "; ".join(reasons)}

    # ---- the last good state -----------------------------------------------------------------
    def start_epoch(self, tr, partial: dict | None, step: int, skipped: int,
                    seconds: float) -> None:
        """A fresh epoch's start is a good state (its last step's check passed); so is the point
        a run resumed at when its checkpoint held no good state of this epoch."""
        if partial is None or self.snapshot is None or self.snapshot["epoch"] != tr.epoch:
            sums, seen = ({}, 0) if partial is None else (partial["sums"], partial["seen"])
            self.snapshot = self.take(tr, step, sums, seen, skipped, seconds)

    def take(self, tr, step: int, sums: dict, seen: int, skipped: int, seconds: float) -> dict:
        """Everything needed to continue epoch tr.epoch after its `step`-th batch exactly."""
        snap = {"epoch": tr.epoch, "model": tr.model.state_dict(),
                "method": tr.method.state_dict(), "optimizer": tr.optimizer.state_dict(),
                "avg": tr.avg.state_dict() if tr.avg is not None else None,
                "loader": tr.loader.state_dict(),
                "partial": {"step": step, "skipped": skipped, "seconds": seconds,
                            "rng": ckpt.rng_state(tr.device), "sums": dict(sums), "seen": seen}}
        return copy.deepcopy(snap)  # state_dicts share storage with the live tensors

    def restore(self, tr) -> None:
        """Put the last good state back; train_epoch then continues the epoch from it."""
        snap = copy.deepcopy(self.snapshot)  # a second collapse may return here again
        if snap["epoch"] != tr.epoch:
            raise RunError(f"co_guard: the last good state is of epoch {snap['epoch']}, "
                           f"not {tr.epoch}")
        tr.model.load_state_dict(snap["model"])
        tr.method.load_state_dict(snap["method"])
        tr.optimizer.load_state_dict(snap["optimizer"])
        match_state_layout(tr.optimizer)
        if tr.avg is not None:
            tr.avg.load_state_dict(snap["avg"])
        tr.loader.load_state_dict(snap["loader"])
        tr.state.partial = snap["partial"]

    def recover(self, tr, event: dict, base) -> None:
        """Return to the last good state, apply the action, and report the event. `base`: the
        epoch's budget as configured (attack_budget), before any action."""
        self.restore(tr)
        action = self.action
        if action == "n_fgsm" and (self.kind or base.kind) == "n_fgsm":
            action = "stop"  # N-FGSM itself collapsed: nothing left to switch to
        if action == "halve_step" and self.step_scale <= 0.5 ** MAX_HALVINGS:
            action = "stop"
        if action == "stop":
            self.stopped = True
        elif action == "halve_step":
            self.step_scale *= 0.5
        else:
            self.kind = "n_fgsm"
        event.update(action=action, restored_to={"epoch": tr.epoch,
                                                 "step": self.snapshot["partial"]["step"]})
        now = ""
        if not self.stopped:
            after = self.adjust(base)
            event["attack"] = {"kind": after.kind, "step_size": after.step_size}
            now = f" (attack now {after.kind}, step {after.step_size * 255:.3g}/255)"
        self.events.append(event)
        if tr.main:
            print(f"at.train: co_guard: catastrophic overfitting at epoch {event['epoch']}, step "
                  f"{event['step']} ({event['reason']}); returned to step "
                  f"{event['restored_to']['step']}; action: {action}{now}", file=sys.stderr,
                  flush=True)
            tr.log.event(event)

    # ---- records -----------------------------------------------------------------------------
    def summary(self) -> dict:
        """For the epoch's metrics record: the latest check and the events so far."""
        best = None if self.best is None or math.isinf(self.best) else self.best
        return {**(self.last or {}), "best_pgd_acc": best, "events": len(self.events)}

    def final_record(self) -> dict:
        """final.json's record: every event, and whether the guard stopped the run."""
        return {"events": copy.deepcopy(self.events), "stopped": self.stopped}

    def state_dict(self) -> dict:
        return {"best": self.best, "events": copy.deepcopy(self.events),
                "step_scale": self.step_scale, "kind": self.kind, "stopped": self.stopped,
                "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.events = state["best"], copy.deepcopy(state["events"])
        self.step_scale, self.kind = state["step_scale"], state["kind"]
        self.stopped, self.last = state["stopped"], state["last"]

