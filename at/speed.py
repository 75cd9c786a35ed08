"""Throughput settings of the training step (config section `speed`), in one place.

What each does and whether it changes results (docs/performance.md; bench/at_step.py measures):

* channels_last: model weights and input batches in NHWC. The convolutions compute the same sums
  in another order (equal in float64, tested; float32 rounding differs at the 1e-7 level), and
  run on oneDNN's fast CPU paths and the GPU's tensor-core kernels. On by default.
* attack_precision / update_precision: bfloat16 autocast for the attack's passes / the outer (and
  AWP) passes. Changes results, so off by default; logits are returned in float32 so that the
  losses and the attack's sign() see float32 values. bf16 has float32's exponent range, so the
  tiny TRADES-start gradients do not underflow as they would in float16
  (docs/performance.md#precision).
* compile: torch.compile of the model (in place: its state_dict keys are unchanged). The attack
  freezes the parameters (attacks.frozen), which keeps the compiled backward from computing
  weight gradients it would throw away (docs/performance.md#frozen-parameters). compile_mode
  picks torch.compile's mode (e.g. max-autotune-no-cudagraphs); it changes kernels, not the
  computation.

Evaluation (validation, final test, AutoAttack) never uses autocast: it is always float32.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn

from errors import ConfigError

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
# torch.compile's modes; "default" passes no mode. The max-autotune ones benchmark alternative GPU
# kernels while compiling (minutes), reduce-overhead adds CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check(speed: dict) -> None:
    """ConfigError (one line) for an invalid `speed` config section."""
    for key in ("attack_precision", "update_precision"):
        if speed[key] not in PRECISIONS:
            raise ConfigError(f"speed.{key} must be one of {', '.join(PRECISIONS)}, "
                              f"got {speed[key]!r}")
    if speed.get("compile_mode", "default") not in COMPILE_MODES:
        raise ConfigError(f"speed.compile_mode must be one of {', '.join(COMPILE_MODES)}, "
                          f"got {speed['compile_mode']!r}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on `device`, or nothing for float32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _float32_logits(module: nn.Module, inputs, output: Tensor):
    # Under autocast the last linear layer returns bf16 logits; every loss and the attack's
    # gradient sign are computed from float32 logits instead (a no-op otherwise).
    if output.dtype != torch.float32:
        return output.float()
    return None


def prepare_model(model: nn.Module, speed: dict) -> nn.Module:
    """Apply the model-side settings in place; returns the model."""
    if speed["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if speed["attack_precision"] != "float32" or speed["update_precision"] != "float32":
        model.register_forward_hook(_float32_logits)
    if speed["compile"]:
        mode = speed.get("compile_mode", "default")
        model.compile(mode=None if mode == "default" else mode)
    return model


def to_memory_format(x: Tensor, speed: dict) -> Tensor:
    """An input batch in the layout the model was prepared for."""
    if speed["channels_last"] and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere CPU autocast
    to bfloat16 is emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
