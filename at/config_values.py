"""Config values checked when a config is loaded, before any data is read or a sweep starts its
first run: registry names (model, dataset, method), a seed numpy can take, and no infinite or NaN
number anywhere (an `.inf` learning rate or loss weight would fail, or silently train nothing,
hours later)."""
from __future__ import annotations

import math

from errors import ConfigError, unknown

SEED_RANGE = (0, 2**32 - 1)  # numpy.random.seed's; seed_everything seeds numpy with the seed


def check_values(cfg: dict) -> None:
    _check_finite(cfg, "")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or \
            not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"seed must be an integer in [{SEED_RANGE[0]}, 2**32 - 1] (numpy's "
                          f"range), got {seed!r}")
    _check_names(cfg)


def _check_finite(node, key: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{key} is {node}: every number in a config must be finite")


def _check_names(cfg: dict) -> None:
    import data as datasets
    import models

    name = cfg["data"]["name"]
    if name not in datasets.NUM_CLASSES:
        raise unknown("dataset (data.name)", name, datasets.NUM_CLASSES)
    known = {**models.MODELS, **models.IMAGENET_MODELS}  # which fits the dataset: build_model
    if cfg["model"]["name"] not in known:
        raise unknown("model (model.name)", cfg["model"]["name"], known)
    # Every method has its parameter section in base.yaml (tests/test_methods.py): the sections
    # name the methods without importing them (at.methods imports the config's own helpers).
    methods = [k for k, v in cfg["method"].items() if isinstance(v, dict)]
    if cfg["method"]["name"] not in methods:
        raise unknown("method (method.name)", cfg["method"]["name"], methods)
