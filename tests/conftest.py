"""Shared fixtures (a digits IKL-AT run and a standard-trained one, trained once per session),
the small-run overrides and in-process training the end-to-end tests share, the `slow` marks of
the tests that train, and how parallel workers share the tests out."""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from at.config import REPO_ROOT, load_config
from at.train import main as train_main
from at.trainer import fit

DIGITS = REPO_ROOT / "configs" / "digits" / "ikl_at.yaml"
# Fixtures that train a run: every test using one is end-to-end, hence `slow` (sh/test.sh --fast
# leaves it out), wherever it is defined. `digits_run` is not one of them: a single cheap epoch, it
# serves the fast tier's tests of argument errors.
TRAINING_FIXTURES = {"learned", "ikl_run", "cost_file", "trained", "run10", "run100",
                     "teacher_run", "sweeps"}
# The modules that take longest (each over a minute of the 2-core whole suite), longest first:
# parallel workers start with them so that the quick tests even out the end (an order that is
# out of date only balances the workers less well).
LONGEST_FIRST = ("test_distill", "test_slurm", "test_folder_data", "test_distributed",
                 "test_sweep", "test_refactor_identity", "test_co_guard", "test_preemption",
                 "test_zoo", "test_train")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    groups = _shared_fixture_groups(items)
    for item, group in groups.items():
        item.add_marker(pytest.mark.xdist_group(group))
    # sh/test.sh runs the tests on parallel workers (pytest-xdist, --dist loadgroup, in this
    # order): the longest modules first, then the other slow tests, then the quick ones, which
    # fill in at the end. A group is scheduled where its first test stands.
    def rank(item):
        module = item.module.__name__ if item.module else ""
        group = [LONGEST_FIRST.index(m) for m in groups.get(item, module).split("+")
                 if m in LONGEST_FIRST]
        return min(group, default=len(LONGEST_FIRST) + (not item.get_closest_marker("slow")))
    items.sort(key=rank)


def _shared_fixture_groups(items) -> dict:
    """{test: group name} joining the tests that share a module-scoped fixture or a training
    session fixture (transitively), so that a parallel run builds each such fixture once, on
    one worker. Tests that share none are left out (each is scheduled on its own)."""
    parent: dict = {}

    def root(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    keys = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = [(d.scope, d.baseid, name) for name in getattr(item, "fixturenames", ())
                  for d in (info.name2fixturedefs.get(name, ()) if info else ())
                  if d.scope == "module" or (d.scope == "session" and name in TRAINING_FIXTURES)]
        if shared:
            keys[item] = shared
            for key in shared[1:]:
                parent[root(key)] = root(shared[0])
    members = collections.defaultdict(dict)  # root -> the modules of its tests, in order
    for item, shared in keys.items():
        members[root(shared[0])][item.module.__name__] = None
    return {item: "+".join(members[root(shared[0])]) for item, shared in keys.items()}


# A short IKL-AT schedule on the digits: the demo's recipe, 8 of its 15 epochs, with a PGD-2
# inner maximisation (step eps_t/2) for the DKL schedule's 5 steps: the same accuracy (about 87 %
# clean, 76 % PGD-10 against the standard model's 31 %) in two thirds of the time.
LEARN = ["optim.epochs=8", "eval.every=100", "attack.schedule=fixed", "attack.steps=2",
         "attack.step_size=4/255"]


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


# For tests of what a run writes, not what it learns: 100 training images in 5 steps of 20 (the
# rest of the digits set is validation) and a clean-only validation (eval.pgd_steps=0:
# val_robust_acc is the clean accuracy), the cheap part of a large validation split.
SMALL_RUN = ["data.val_size=1337", "optim.batch_size=20", "eval.pgd_steps=0"]


def train_in_process(args: list[str]) -> int:
    """`python -m at.train ARGS` as main() in this process (no interpreter to start), on one
    thread as the test's launched processes (OMP_NUM_THREADS=1): a run compared weight for weight
    with theirs must sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_main(args)
    finally:
        torch.set_num_threads(threads)


# One epoch of plain training on 1,405 images, validation PGD-1 on 32: seconds, not minutes.
STUB = ["method.name=standard", "optim.epochs=1", "optim.batch_size=256", "data.val_size=32",
        "eval.pgd_steps=1", "eval.n_test=32", "eval.final_pgd=false", "log.plot=false"]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A real digits run directory (wrn-16-1, config.yaml, last.pt, best.pt, final.json) whose
    model is barely trained (about 10 % accuracy): for tests that need a run directory, not a
    model that learned (argument errors, loading). Shared by the session: a test that writes
    into a run directory copies it first."""
    out = tmp_path_factory.mktemp("digits_run") / "run"
    fit(load_config(DIGITS, [*STUB, f"out_dir={out}"]))
    return out


class CodeOnLoad:
    """Unpickling this object would create a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
