"""Training methods, chosen by `method.name` from a plain dict; parameters come from the config
section of the same name (configs/base.yaml declares them)."""
from __future__ import annotations

from errors import unknown

from .base import Method, StepOutput
from .distill import Distill
from .ikl_at import IKLAT
from .lbgat import LBGAT
from .pgd_at import PGDAT
from .standard import Standard
from .trades import TRADES

METHODS: dict[str, type[Method]] = {
    "standard": Standard,
    "pgd_at": PGDAT,
    "trades": TRADES,
    "ikl_at": IKLAT,
    "lbgat": LBGAT,
    "distill": Distill,
}


def build_method(method_cfg: dict, num_classes: int, views: int = 1) -> Method:
    """Instantiate `method_cfg['name']` with the parameters in `method_cfg[name]`; `views`: views
    per training batch (2 with data.second_view), fixed for the run."""
    name = method_cfg["name"]
    if name not in METHODS:
        raise unknown("method", name, sorted(METHODS))
    method = METHODS[name](num_classes, label_smoothing=method_cfg.get("label_smoothing", 0.0),
                           **(method_cfg.get(name) or {}))
    method.views = views
    return method


__all__ = ["METHODS", "build_method", "Method", "StepOutput"]
