"""RobustBench's own architecture classes, for checking that our weights mean the same there.

They are loaded from the installed robustbench package's files by path: importing the package
itself fails without its optional dependencies (docs/evaluation.md#robustbench-import).
robustbench is a test requirement (sh/test.sh installs it with --no-deps); without it these
functions return None.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

from torch import nn

# The architecture files the CIFAR model zoo imports its classes from.
ARCH_FILES = ("wide_resnet", "dm_wide_resnet", "resnet")


@functools.cache
def architecture_module(stem: str) -> ModuleType | None:
    """robustbench/model_zoo/architectures/<stem>.py as a module, or None when absent."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model_zoo" / "architectures" / f"{stem}.py"
    if not path.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location(f"_robustbench_arch_{stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def zoo_namespace() -> dict | None:
    """The names robustbench/model_zoo/cifar10.py and cifar100.py give their entries
    (`nn`, WideResNet, DMWideResNet, PreActResNet, CIFAR*_MEAN/STD, ...), or None."""
    namespace: dict = {"nn": nn}
    for stem in ARCH_FILES:
        module = architecture_module(stem)
        if module is None:
            return None
        namespace.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    return namespace
