"""Weight averaging: an averaged copy of the model, held in memory and updated during training.

Two kinds (docs/reference.md#weight-averaging):

* ``step_ema`` (Wang et al. 2023, ``WATrainer``): after every optimizer step, on the PARAMETERS
  only, ``ema = d * ema + (1 - d) * theta`` with the dynamic decay
  ``d = min(tau, (1 + t') / (10 + t'))``, ``t' = step - warmup_steps``, where ``step`` is the
  1-based number of optimizer steps taken so far (the reference increments its ``global_step``
  before the EMA update, so its first update sees 1), and ``d = 0`` (the EMA follows the model)
  while ``step < warmup_steps``. At every epoch end the buffers (BN running
  statistics) are copied from the live model. ``start`` is not used (the warm-up plays its role);
  the average is always ``ready``.
* ``epoch_ema`` (the DKL repository's ``swa.py <dir> 0.9 1 200``, done in memory instead of over
  per-epoch checkpoint files): at the end of epoch ``start`` the average becomes a copy of the whole
  state (parameters and buffers); at every later epoch end ``avg = tau * avg + (1 - tau) * theta``
  for every floating-point entry (parameters, BN running mean / var), i.e. ``avg_i = 0.1 * theta_i
  + 0.9 * avg_{i-1}`` for tau 0.9; integer buffers (``num_batches_tracked``) are copied. Before the
  end of epoch ``start`` the average is not defined: ``ready`` is False and ``module`` still holds
  the weights it was built from.

The trainer calls ``update_step`` after every optimizer step and ``update_epoch`` at every epoch
end whatever the kind (a kind ignores the call it does not use), validates ``module`` when
``ready``, and saves ``state_dict()`` (tensors and plain values: it loads with
``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from errors import ConfigError

KINDS = ("none", "step_ema", "epoch_ema")
# Reference decays: Wang et al.'s --tau default and the DKL scripts' swa.py argument.
DEFAULT_DECAY = {"step_ema": 0.995, "epoch_ema": 0.9}


def step_decay(step: int, tau: float, warmup_steps: float) -> float:
    """Wang et al.'s decay after the global 1-based optimizer step `step` (0 during the warm-up):
    their `ema_update` receives the step counter already incremented for the step just taken."""
    if step < warmup_steps:
        return 0.0
    delta = step - warmup_steps
    return min(tau, (1.0 + delta) / (10.0 + delta))


def check_args(kind: str, decay: float, start: int = 1, warmup_steps: float = 0) -> None:
    """ValueError (one line) for arguments that `WeightAverage` cannot use."""
    if kind not in KINDS:
        raise ValueError(f"unknown weight-averaging kind {kind!r}; valid: {', '.join(KINDS)}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"weight-averaging decay must be in [0, 1), got {decay}")
    if isinstance(start, bool) or int(start) != start or start < 1:
        raise ValueError(f"weight-averaging start must be an epoch >= 1, got {start}")
    if not warmup_steps >= 0:  # also rejects NaN
        raise ValueError(f"weight-averaging warmup_steps must be >= 0, got {warmup_steps}")


class WeightAverage:
    """Averaged copy of a model held in memory (no per-epoch checkpoint files)."""

    def __init__(self, model: nn.Module, kind: str, decay: float, start: int = 1,
                 warmup_steps: float = 0):
        check_args(kind, decay, start, warmup_steps)
        if kind == "none":
            raise ValueError("weight-averaging kind 'none' means no average: do not build one")
        self.kind, self.decay = kind, float(decay)
        self.start, self.warmup_steps = int(start), float(warmup_steps)
        self.module = copy.deepcopy(model)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.updates = 0       # parameter-averaging updates applied (steps or epochs)
        self.last_step = 0     # last global step seen by update_step
        self.last_epoch = 0    # last epoch seen by update_epoch
        self._initialized = kind == "step_ema"
        self._params = list(self.module.parameters())
        self._buffers = list(self.module.buffers())
        state = self.module.state_dict()
        self._keys = list(state)
        self._float = [k for k, v in state.items() if v.is_floating_point()]
        self._other = [k for k, v in state.items() if not v.is_floating_point()]

    @property
    def ready(self) -> bool:
        """Whether `module` holds an average (False for epoch_ema before the end of epoch start)."""
        return self._initialized

    # ---- updates ------------------------------------------------------------------------------
    @torch.no_grad()
    def update_step(self, model: nn.Module, step: int) -> None:
        """After optimizer step `step` (global, 1-based); only step_ema uses it."""
        if step <= self.last_step:
            raise ValueError(f"update_step: step {step} is not after the last one "
                             f"({self.last_step})")
        self.last_step = step
        if self.kind != "step_ema":
            return
        live = list(model.parameters())
        if len(live) != len(self._params):
            raise ValueError(f"update_step: the model has {len(live)} parameters, the average "
                             f"{len(self._params)}")
        decay = step_decay(step, self.decay, self.warmup_steps)
        if decay == 0.0:
            torch._foreach_copy_(self._params, live)
        else:
            torch._foreach_lerp_(self._params, live, 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def update_epoch(self, model: nn.Module, epoch: int) -> None:
        """At the end of epoch `epoch` (1-based)."""
        if epoch <= self.last_epoch:
            raise ValueError(f"update_epoch: epoch {epoch} is not after the last one "
                             f"({self.last_epoch})")
        self.last_epoch = epoch
        if self.kind == "step_ema":
            live = list(model.buffers())
            if len(live) != len(self._buffers):
                raise ValueError(f"update_epoch: the model has {len(live)} buffers, the average "
                                 f"{len(self._buffers)}")
            if live:
                torch._foreach_copy_(self._buffers, live)
            return
        if epoch < self.start:
            return
        live_state = model.state_dict()
        if list(live_state) != self._keys:
            raise ValueError("update_epoch: the model's state_dict keys differ from the average's")
        own = self.module.state_dict()  # shares storage with the module: in-place ops update it
        avg_f, live_f = [own[k] for k in self._float], [live_state[k] for k in self._float]
        if self._initialized:
            if avg_f:
                torch._foreach_lerp_(avg_f, live_f, 1.0 - self.decay)
        elif avg_f:
            torch._foreach_copy_(avg_f, live_f)
        for k in self._other:
            own[k].copy_(live_state[k])
        self._initialized = True
        self.updates += 1

    # ---- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The averaged model's state_dict (under 'model', tensors shared with `module`: save it
        before the next update) and the counters; plain values only (torch.load weights_only)."""
        return {"kind": self.kind, "decay": self.decay, "start": self.start,
                "warmup_steps": self.warmup_steps, "ready": self._initialized,
                "updates": self.updates, "last_step": self.last_step,
                "last_epoch": self.last_epoch, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; the kind must match (decay, start and warm-up stay as
        constructed: the run's configuration decides them)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"weight-average state is of kind {state.get('kind')!r}, "
                             f"expected {self.kind!r}")
        self.module.load_state_dict(state["model"])
        self._initialized = bool(state["ready"])
        self.updates = int(state["updates"])
        self.last_step, self.last_epoch = int(state["last_step"]), int(state["last_epoch"])


def check_config(avg: dict) -> None:
    """ConfigError (one line) for a bad `avg` config section (keys kind, decay, start, warmup)."""
    kind, decay = avg["kind"], avg["decay"]
    if kind not in KINDS:
        raise ConfigError(f"avg.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float))
                              or not 0.0 <= decay < 1.0):
        raise ConfigError(f"avg.decay must be null or in [0, 1), got {decay!r}")
    start = avg["start"]
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise ConfigError(f"avg.start must be an epoch >= 1, got {avg['start']!r}")
    warmup = avg["warmup"]
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) \
            or not 0.0 <= warmup <= 1.0:
        raise ConfigError(f"avg.warmup must be a fraction of the training steps in [0, 1], "
                         f"got {warmup!r}")


def from_config(model: nn.Module, avg: dict, *, epochs: int,
                steps_per_epoch: int) -> WeightAverage | None:
    """The average an `avg` config section asks for (None for kind 'none'). decay null = the
    kind's reference value; warm-up = avg.warmup * epochs * steps_per_epoch steps (step_ema)."""
    check_config(avg)
    if avg["kind"] == "none":
        return None
    decay = DEFAULT_DECAY[avg["kind"]] if avg["decay"] is None else float(avg["decay"])
    return WeightAverage(model, avg["kind"], decay, start=avg["start"],
                         warmup_steps=avg["warmup"] * epochs * steps_per_epoch)
