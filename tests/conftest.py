"""Shared fixtures: a digits IKL-AT run and a standard-trained one, trained once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from at.config import REPO_ROOT, load_config
from at.trainer import fit

DIGITS = REPO_ROOT / "configs" / "digits" / "ikl_at.yaml"
# Fixtures that train a run: every test using one is end-to-end, hence `slow` (sh/test.sh --fast
# leaves it out), wherever it is defined.
TRAINING_FIXTURES = {"learned", "ikl_run", "cost_file", "trained", "run10", "run100",
                     "teacher_run", "sweeps"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# A short IKL-AT schedule on the digits: the demo's recipe, 8 of its 15 epochs.
LEARN = ["optim.epochs=8", "eval.every=100"]


@pytest.fixture(scope="session")
def learned(tmp_path_factory):
    """{'ikl_at': (run_dir, final results), 'standard': (...)}: same model, data, epochs, eps."""
    root = tmp_path_factory.mktemp("learn")
    runs = {}
    for name in ("ikl_at", "standard"):
        out = root / name
        cfg = load_config(DIGITS, [*LEARN, f"method.name={name}", f"out_dir={out}"])
        runs[name] = (out, fit(cfg))
    return runs


class CodeOnLoad:
    """Unpickling this object would create a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
