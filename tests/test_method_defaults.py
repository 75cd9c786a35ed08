"""configs/base.yaml and the method constructors declare the same defaults: a method built from
the base config is the method its class documents, and a parameter added to one place but not the
other is caught here."""
from __future__ import annotations

import inspect

import pytest

from at.config import load_config
from at.methods import METHODS


def _defaults(cls) -> dict:
    """The constructor's keyword parameters and their defaults (num_classes has none)."""
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in ("self", "num_classes") and p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_base_config_defaults_equal_the_constructor_defaults(name):
    section = load_config()["method"]
    defaults = _defaults(METHODS[name])
    assert defaults.pop("label_smoothing") == section["label_smoothing"]
    assert (section[name] or {}) == defaults


def test_a_mismatch_is_seen():
    class Drifted(METHODS["trades"]):
        def __init__(self, num_classes, beta: float = 7.0, forwards: str = "clean,adv,clean",
                     label_smoothing: float = 0.0):
            super().__init__(num_classes, beta, forwards, label_smoothing)

    assert _defaults(Drifted) != load_config()["method"]["trades"] | {"label_smoothing": 0.0}
