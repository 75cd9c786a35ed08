"""One error style: every user-fixable error is a UserError, entry points print it as one line
and exit 1, and anything else (a bug) keeps its traceback."""
from __future__ import annotations

import pytest

import at.train
from at.checkpoint import CheckpointError
from at.config import load_config
from errors import (
    USER_ERRORS,
    ConfigError,
    DataError,
    EvalError,
    NonFiniteLoss,
    RunError,
    UserError,
)


@pytest.mark.parametrize("cls", [ConfigError, RunError, NonFiniteLoss, EvalError, CheckpointError,
                                 DataError])
def test_every_error_class_is_a_user_error(cls):
    assert issubclass(cls, UserError)


def test_config_errors_stay_value_errors():
    # Callers that caught ValueError from constructors and registries keep working.
    with pytest.raises(ValueError, match="unknown config key 'optim.epoch'"):
        load_config(None, ["optim.epoch=3"])


def test_entry_point_reports_a_user_error_on_one_line(monkeypatch, capsys):
    def fail(cfg, resume=False):
        raise RunError("out_dir x is a file")

    monkeypatch.setattr(at.train, "fit", fail)
    assert at.train.main(["optim.epochs=1"]) == 1
    err = capsys.readouterr().err
    assert err == "at.train: error: out_dir x is a file\n"


def test_entry_point_lets_a_bug_through(monkeypatch):
    def bug(cfg, resume=False):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(at.train, "fit", bug)
    assert not issubclass(ValueError, USER_ERRORS)
    with pytest.raises(ValueError, match="a bug"):
        at.train.main(["optim.epochs=1"])
