"""The trainer's final test (at/validation.py): the last, best and averaged weights are measured
on the whole test set; weights equal to ones already measured are not attacked again, and get
the numbers an attack of their own would give."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import DIGITS

import data
import models
from at.config import load_config
from at.validation import Evaluator


@pytest.fixture
def evaluator():
    cfg = load_config(DIGITS, ["eval.pgd_steps=2", "eval.batch_size=64"])
    s = data.load_splits("digits")
    test = data.TensorEvalSet(s.test_x[:96], s.test_y[:96])
    return Evaluator(cfg, {"val": None, "test": test}, 10, torch.device("cpu"))


def test_equal_weights_are_measured_once_with_the_numbers_of_their_own_attack(evaluator,
                                                                             monkeypatch):
    torch.manual_seed(0)
    model = models.build_model("wrn-16-1", 10, dataset="digits").eval()
    other = models.build_model("wrn-16-1", 10, dataset="digits").eval()
    alone = {name: evaluator.final([(name, 3, m)])[name] for name, m in
             (("last", model), ("avg", other))}
    calls = []
    measure = evaluator.class_hits
    monkeypatch.setattr(evaluator, "class_hits",
                        lambda *a, **k: calls.append(1) or measure(*a, **k))
    rows = evaluator.final([("last", 3, model), ("best", 2, copy.deepcopy(model)),
                            ("avg", 3, other)])
    assert len(calls) == 4  # clean and PGD of `last` and of `avg`; `best` is `last`'s weights
    assert rows["last"] == alone["last"] and rows["avg"] == alone["avg"]
    assert rows["best"] == {**alone["last"], "epoch": 2}
    assert "test_robust_acc" in rows["best"]
