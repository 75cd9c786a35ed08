"""A cost matrix between classes on disk (made by python -m at.kd_cost_matrix) as training reads
it. Apart from the command that makes it, so that a method loading it imports no config code."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from errors import ConfigError

from . import checkpoint as ckpt

FORMAT = 1


def nonfinite(cost: Tensor) -> str | None:
    """'NaN/inf costs (3 of them, the first between classes i and j)', or None."""
    bad = (~torch.isfinite(cost)).nonzero()
    if not len(bad):
        return None
    i, j = (int(v) for v in bad[0])
    return f"NaN/inf costs ({len(bad)} of them, the first between classes {i} and {j})"


def load_cost_matrix(path: str, num_classes: int, sharpen: float = 1.0) -> Tensor:
    """The training cost: D <- 1 - exp(-sharpen * D), then relu(D) + 1e-8 (float32, C x C)."""
    saved = ckpt.load(Path(path))
    cost = saved.get("cost") if isinstance(saved, dict) else None
    if saved.get("format") != FORMAT or cost is None or cost.shape != (num_classes,
                                                                          num_classes):
        raise ConfigError(f"{path} is not a {num_classes}-class cost matrix made by "
                         f"python -m at.kd_cost_matrix")
    problem = nonfinite(cost)
    if problem:
        raise ConfigError(f"{path} holds {problem}; make it again with "
                          f"python -m at.kd_cost_matrix")
    return (1 - torch.exp(-sharpen * cost)).clamp_min(0.0).float() + 1e-8
