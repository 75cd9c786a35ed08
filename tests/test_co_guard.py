"""The catastrophic-overfitting guard (at/co_guard.py): bad values refused at load, a synthetic
collapse detected and rolled back to the saved state tensor for tensor, and (slow) a guarded run
that resumes bit-exactly after SIGKILL, before and after a collapse."""
from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
from conftest import DIGITS, SMALL_RUN

from at import checkpoint as ckpt
from at.co_guard import COGuard
from at.config import load_config
from at.train import main
from at.trainer import Trainer
from errors import UserError

# 5 steps of 20 images per epoch (100 training images, the rest validation), AWP and a per-step
# EMA so that their state has to come back too; checks every 2 steps on 32 held-out images. The
# end-of-run validation is clean accuracy only (eval.pgd_steps=0): no test here reads it.
GUARDED = ["attack.schedule=fixed", "attack.eps_ramp=false", "attack.kind=fgsm_rs", *SMALL_RUN,
           "optim.epochs=2", "awp.enabled=true", "awp.warmup=1",
           "avg.kind=step_ema", "eval.every=100", "eval.final_pgd=false", "eval.n_test=50",
           "log.plot=false", "train.co_guard.enabled=true",
           "train.co_guard.every=2", "train.co_guard.batch=32", "train.co_guard.pgd_steps=2"]


@pytest.mark.parametrize("overrides,message", [
    (["attack.kind=fgsm_sr"], "unknown attack.kind 'fgsm_sr'"),
    (["attack.kind=n_fgsm", "attack.n_fgsm_k=0"], "attack.n_fgsm_k"),
    (["method.grad_align=-0.1"], "method.grad_align"),
    (["train.co_guard.batch=2000"], "larger than the validation split"),
    (["attack.kind=pgd"], "attack.kind=pgd has no single-step form"),
    (["method.name=standard"], "method standard has no single-step form"),
    (["train.co_guard.action=restart"], "train.co_guard.action"),
])
def test_bad_values_are_one_line_before_any_data(overrides, message, capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["-c", str(DIGITS), *GUARDED, *overrides, "data.root=/nonexistent", f"out_dir={out}"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
    with pytest.raises(UserError):
        load_config(DIGITS, [*GUARDED, *overrides])


def test_collapse_rules():
    from data import TensorEvalSet
    cfg = load_config(DIGITS, GUARDED)  # drop 0.5, gap 0.3
    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    guard = COGuard(cfg, TensorEvalSet(images, torch.zeros(64, dtype=torch.long)), 10,
                    torch.device("cpu"))
    assert guard.collapse_reasons(0.0, 0.3) == []  # no best yet; a gap of 0.3 is not above 0.3
    guard.best = 0.15  # below twice chance (0.2): an untrained model's noise
    assert guard.collapse_reasons(0.05, 0.1) == []
    guard.best = 0.6
    assert guard.collapse_reasons(0.31, 0.4) == []
    (drop,) = guard.collapse_reasons(0.29, 0.4)
    assert drop.startswith("pgd accuracy 0.290 < 0.5 x best 0.600")
    assert [r.split()[0] for r in guard.collapse_reasons(0.05, 0.9)] == ["pgd", "fgsm"]
    assert guard.collapse_reasons(0.5, 0.81)[0].startswith("fgsm - pgd accuracy 0.310")


def _scripted(collapse_at: set[tuple[int, int]], trace: dict):
    """COGuard.measure running the real check, then reporting a collapse (PGD 0, FGSM 0.9) at
    the (epoch, step) points in `collapse_at` while no action has been taken, else 0.5 / 0.5.
    `trace[(epoch, step)]`: the trainer's state at each check."""
    real = COGuard.measure

    def measure(self, model, epoch, step):
        real(self, model, epoch, step)
        tr = self._trainer
        trace[(epoch, step)] = copy.deepcopy({
            "model": tr.model.state_dict(), "method": tr.method.state_dict(),
            "optimizer": tr.optimizer.state_dict(), "avg": tr.avg.state_dict(),
            "rng": torch.get_rng_state(), "loader": tr.loader.state_dict()})
        fresh = self.step_scale == 1.0 and self.kind is None and not self.events
        return (0.0, 0.9) if (epoch, step) in collapse_at and fresh else (0.5, 0.5)
    return measure


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("action", ["stop", pytest.param("halve_step", marks=pytest.mark.slow)])
def test_a_collapse_returns_to_the_last_good_check_tensor_for_tensor(action, tmp_path,
                                                                      monkeypatch):
    trace: dict = {}
    monkeypatch.setattr(COGuard, "measure", _scripted({(1, 4)}, trace))
    cfg = load_config(DIGITS, [*GUARDED, f"train.co_guard.action={action}",
                               f"out_dir={tmp_path / 'run'}"])
    tr = Trainer(cfg)
    tr.guard._trainer = tr
    restored = {}
    real_restore = COGuard.restore

    def restore(self, trainer):
        real_restore(self, trainer)
        restored.update(copy.deepcopy({
            "model": trainer.model.state_dict(), "method": trainer.method.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "avg": trainer.avg.state_dict(),
            "partial": trainer.state.partial, "loader": {  # as load_state_dict left it
                "generator": trainer.loader.generator.get_state(),
                "augmenter": trainer.loader._augmenter.get_state(),
                "step": trainer.loader._resume_step, "epoch": trainer.loader.epoch}}))
    monkeypatch.setattr(COGuard, "restore", restore)
    tr.epoch = 1
    record = tr.train_epoch()

    (event,) = tr.guard.events
    assert (event["epoch"], event["step"], event["restored_to"]) == \
        (1, 4, {"epoch": 1, "step": 2})
    assert "fgsm - pgd" in event["reason"] and event["action"] == action
    good = trace[(1, 2)]  # the state at the last passed check
    for key in ("model", "method", "optimizer", "avg"):
        assert _same(restored[key], good[key]), f"{key} differs from the saved state"
    assert _same(restored["loader"], {k: good["loader"][k] for k in restored["loader"]})
    assert restored["loader"]["step"] == 2
    assert torch.equal(restored["partial"]["rng"]["torch"], good["rng"])
    assert not _same(trace[(1, 4)]["model"], good["model"])  # training had moved on
    if action == "stop":
        assert record is None and tr.guard.stopped
        assert _same(tr.model.state_dict(), good["model"])
    else:  # steps 3..5 redone with half the step; the epoch ends normally
        assert record["co_guard"]["events"] == 1 and tr.guard.step_scale == 0.5
        assert (1, 5) in trace and not tr.guard.stopped
        budget = tr._start_epoch(None)
        assert budget.step_size == pytest.approx(0.5 * 1.25 * cfg["attack"]["eps"])


@pytest.mark.slow
def test_passing_checks_leave_training_untouched(tmp_path):
    """The check runs in eval mode with its own generator: the same weights as without it."""
    plain = ["optim.epochs=1", "train.co_guard.enabled=false"]
    runs = []
    for name, extra in (("guarded", ["optim.epochs=1", "train.co_guard.gap=1.0"]),
                        ("plain", plain)):
        cfg = load_config(DIGITS, [*GUARDED, *extra, f"out_dir={tmp_path / name}"])
        tr = Trainer(cfg)
        tr.epoch = 1
        tr.train_epoch()
        runs.append(tr.model.state_dict())
    assert _same(*runs)


# A driver for at.train with the scripted check and a SIGKILL at the k-th optimizer step.
DRIVER = textwrap.dedent("""
    import os, signal, sys, torch
    from at.co_guard import COGuard
    k, collapse = int(sys.argv[1]), {(1, 4), (2, 2)}
    count, real = [0], COGuard.measure
    def measure(self, model, epoch, step):
        real(self, model, epoch, step)
        fresh = self.step_scale == 1.0 and self.kind is None
        again = len(self.events) == 1 and (epoch, step) == (2, 2)
        hit = (epoch, step) in collapse and (fresh or again)
        return (0.0, 0.9) if hit else (0.5, 0.5)
    COGuard.measure = measure
    step = torch.optim.SGD.step
    def counted(self, *a, **kw):
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *a, **kw)
    torch.optim.SGD.step = counted
    from at.train import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_a_guarded_run_resumes_bit_exactly_after_sigkill(tmp_path):
    """Scripted collapses with halve_step: step 4 of epoch 1 rolls back to step 2, and step 2
    of epoch 2 to the epoch's start. Killed (a) inside epoch 1 before the
    collapse, with a mid-epoch last.pt after every step (the last good state travels in it), and
    (b) in epoch 2 after the first collapse (its effect travels in last.pt)."""
    import os
    import subprocess
    import sys

    from at.config import REPO_ROOT
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    common = ["-c", str(DIGITS), *GUARDED, "train.co_guard.action=halve_step"]

    def run(k: int, out, *extra):
        return subprocess.run([sys.executable, "-c", DRIVER, str(k), *common, f"out_dir={out}",
                               *extra], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=600)

    straight = tmp_path / "straight"
    done = run(0, straight)
    assert done.returncode == 0, done.stderr
    final = json.loads((straight / "final.json").read_text())
    events = final["co_guard"]["events"]
    assert [(e["epoch"], e["step"], e["restored_to"]["step"]) for e in events] == \
        [(1, 4, 2), (2, 2, 0)]
    assert [e["attack"]["step_size"] for e in events] == pytest.approx(
        [1.25 * 8 / 255 / 2, 1.25 * 8 / 255 / 4])  # halved twice
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in lines] == ["co_guard", None, "co_guard", None]

    for name, k, extra in (("mid", 3, ["checkpoint.every_minutes=1e-9"]), ("late", 9, [])):
        out = tmp_path / name
        killed = run(k, out, *extra)
        assert killed.returncode == -9, killed.stderr
        state = ckpt.load(out / "last.pt")
        if name == "mid":  # after step 2 of epoch 1, holding the good state of step 2
            assert state["partial"]["step"] == 2
            assert state["partial"]["ranks"][0]["co_guard"]["partial"]["step"] == 2
        else:  # epoch 1 done (7 steps with the redone ones), the halving saved
            assert state["epoch"] == 1 and state["co_guard"]["step_scale"] == 0.5
        resumed = run(0, out, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        a, b = ckpt.load(straight / "last.pt"), ckpt.load(out / "last.pt")
        for key in ("model", "method", "optimizer", "avg"):
            assert _same(a[key], b[key]), f"{name}: {key} differs from the uninterrupted run"
        assert json.loads((out / "final.json").read_text())["co_guard"] == final["co_guard"]
