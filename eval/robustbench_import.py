"""robustbench imported whole, for loading published models through its own `load_model`.

robustbench's package `__init__` imports `autoattack`, the module name of AutoAttack's GitHub
release; the PyPI release robustbench declares, pyautoattack (the one this project uses), has the
same code under the name `pyautoattack`. Before robustbench is imported, `autoattack` and its
submodules are registered as aliases of pyautoattack's, so both names are one module
(docs/zoo.md#dependencies). An `autoattack` that is already importable (the GitHub release) is
left alone. Its other dependencies are in requirements-zoo.txt.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import warnings
from types import SimpleNamespace

from errors import EvalError

INSTALL = "pip install -r requirements-zoo.txt"
ALIASED = ("autoattack", "state", "autopgd_base", "fab_pt", "square", "other_utils", "checks")


def register_autoattack_alias() -> None:
    """Make `import autoattack[.sub]` give pyautoattack[.sub] when no `autoattack` exists."""
    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    import pyautoattack
    sys.modules["autoattack"] = pyautoattack
    for sub in ALIASED:
        try:
            sys.modules[f"autoattack.{sub}"] = importlib.import_module(f"pyautoattack.{sub}")
        except ImportError:  # a submodule this pyautoattack release does not have
            continue


@functools.cache
def robustbench() -> SimpleNamespace:
    """robustbench's `load_model`, its zoo (`model_dicts`) and enums; EvalError (one line saying
    what to install) when robustbench or one of its dependencies is missing."""
    register_autoattack_alias()
    try:
        with warnings.catch_warnings():  # its pkg_resources import warns on every start
            warnings.simplefilter("ignore")
            from robustbench.model_zoo import model_dicts
            from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
            from robustbench.utils import load_model
    except ImportError as err:
        missing = getattr(err, "name", None) or str(err)
        raise EvalError(f"rb: targets need robustbench and its dependencies ({missing} is "
                        f"missing): {INSTALL}") from None
    return SimpleNamespace(load_model=load_model, model_dicts=model_dicts,
                           BenchmarkDataset=BenchmarkDataset, ThreatModel=ThreatModel)
