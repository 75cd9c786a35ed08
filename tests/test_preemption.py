"""Preemption and failure: a run stopped at any moment (SIGTERM, SIGKILL mid-epoch, SIGKILL while a
checkpoint is being written) continues with --resume to the weights of an uninterrupted run;
non-finite steps can be skipped; a full disk leaves the previous checkpoint intact."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import DIGITS, SMALL_RUN, CodeOnLoad

from at import checkpoint, run_dir
from at.checkpoint import load
from at.config import REPO_ROOT, load_config
from at.train import main
from at.trainer import Trainer, fit
from errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, NonFiniteLoss, RunError

# 5 steps per epoch (100 training images: the rest of the digits set is validation; batch 20), AWP
# from epoch 1 and a per-step EMA, so that their state has to survive too; checkpoint.every_minutes
# is set per run (it may change on resume). Validation is clean accuracy only (SMALL_RUN).
SMALL = [*SMALL_RUN, "eval.every=100", "eval.final_pgd=false", "eval.n_test=50",
         "log.plot=false"]
COMMON = ["-c", str(DIGITS), "attack.schedule=fixed", "attack.steps=1", "attack.step_size=8/255",
          *SMALL, "optim.epochs=2", "awp.enabled=true", "awp.warmup=1", "avg.kind=step_ema"]

# Runs at.train with a stop injected at a chosen point: "term K" sends SIGTERM to itself just
# before the K-th optimizer step ("int K" SIGINT, "int2 K" two SIGINTs: a double Ctrl-C);
# "kill_write K" SIGKILLs itself inside the K-th write of last.pt,
# after the temporary file is complete and before it replaces last.pt.
DRIVER = textwrap.dedent("""
    import os, signal, sys, torch
    import at.checkpoint as ckpt
    mode, k = sys.argv[1], int(sys.argv[2])
    count = [0]
    signals = {"term": [signal.SIGTERM], "int": [signal.SIGINT], "int2": [signal.SIGINT] * 2}
    if mode in signals:
        step = torch.optim.SGD.step
        def counted(self, *a, **kw):
            count[0] += 1
            if count[0] == k:
                for signum in signals[mode]:
                    os.kill(os.getpid(), signum)
            return step(self, *a, **kw)
        torch.optim.SGD.step = counted
    elif mode == "kill_write":
        replace = ckpt.os.replace
        def dying(src, dst):
            if str(dst).endswith("last.pt"):
                count[0] += 1
                if count[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            return replace(src, dst)
        ckpt.os.replace = dying
    from at.train import main
    sys.exit(main(sys.argv[3:]))
""")


def _run(*args: str, stop: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-c", DRIVER, *(map(str, stop) if stop else ("none", "0")), *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_stops_anywhere_resume_to_the_uninterrupted_weights(tmp_path, capsys):
    straight = tmp_path / "straight"
    done = _run(*COMMON, f"out_dir={straight}")
    assert done.returncode == 0, done.stderr

    run = tmp_path / "run"
    every_step = "checkpoint.every_minutes=1e-9"  # a mid-epoch checkpoint after every step
    # 1. SIGTERM before step 3 of epoch 1: saved after step 3, exit 75, marker for job scripts.
    term = _run(*COMMON, f"out_dir={run}", stop=("term", 3))
    assert term.returncode == EXIT_PREEMPTED, term.stderr
    assert "epoch 1, step 3 of 5" in term.stderr and "--resume" in term.stderr
    state = load(run / "last.pt")
    assert state["epoch"] == 0 and state["partial"]["step"] == 3
    assert json.loads((run / "preempted.json").read_text())["signal"] == 15
    # 2. resumed with a checkpoint after every step, SIGKILLed inside its 4th last.pt write
    #    (epoch 2, step 2: the temporary file is complete, last.pt still the previous step's).
    killed = _run(*COMMON, every_step, f"out_dir={run}", "--resume", stop=("kill_write", 4))
    assert killed.returncode == -9, killed.stderr
    assert not (run / "preempted.json").exists()
    state = load(run / "last.pt")
    assert state["epoch"] == 1 and state["partial"]["step"] == 1
    # 3. resumed again: it runs to the end.
    final = _run(*COMMON, f"out_dir={run}", "--resume")
    assert final.returncode == 0, final.stderr

    a, b = load(straight / "last.pt"), load(run / "last.pt")
    assert _same(a["model"], b["model"]), "weights differ from the uninterrupted run"
    assert _same(a["avg"]["model"], b["avg"]["model"]), "weight average differs"
    assert _same(a["method"], b["method"]), "class prior differs"
    assert _same(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    reference = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "train_adv_acc", "val_robust_acc"):  # sums carried across the stops
        assert [r.get(key) for r in records] == pytest.approx([r.get(key) for r in reference])

    # A resumed run may extend its schedule, but not silently change the experiment (refused
    # before any training: at.train's main in this process).
    capsys.readouterr()
    assert main([*COMMON, "optim.epochs=4", "model.name=wrn-16-4", f"out_dir={run}",
                 "--resume"]) == 1
    assert "differs from the run's in: model.name" in capsys.readouterr().err
    assert main([*COMMON, "optim.epochs=4", f"data.generated.path={tmp_path}", f"out_dir={run}",
                 "--resume"]) == 1
    assert "data.generated.path" in capsys.readouterr().err
    assert _same(load(run / "last.pt")["model"], b["model"])  # nothing was written


class _PoisonedSteps:
    """Wraps the trainer's outer loss; the calls in `bad` return a NaN loss term."""

    def __init__(self, objective, bad: set[int]):
        self.objective, self.bad, self.calls = objective, bad, 0

    def __call__(self, *args):
        out = self.objective(*args)
        self.calls += 1
        if self.calls in self.bad:
            first = next(iter(out.terms))
            out.terms[first] = out.terms[first] * float("nan")
        return out


class _PoisonedImages(_PoisonedSteps):
    """The calls in `bad` see NaN images: as with a real NaN batch, the train-mode forward also
    writes NaN into the BatchNorm running statistics."""

    def __call__(self, x, y, x_adv):
        self.calls += 1
        if self.calls in self.bad:
            x, x_adv = x * float("nan"), x_adv * float("nan")
        return self.objective(x, y, x_adv)


def _quick(out: Path, *extra: str) -> dict:
    return load_config(DIGITS, ["attack.schedule=fixed", "attack.steps=1", "optim.epochs=1",
                                *SMALL, f"out_dir={out}", *extra])


@pytest.mark.slow
def test_skip_nonfinite_skips_up_to_the_limit(tmp_path):
    trainer = Trainer(_quick(tmp_path / "skip", "train.skip_nonfinite=2"))
    trainer.objective = _PoisonedSteps(trainer.objective, {2, 4})
    trainer.fit()
    record = json.loads((tmp_path / "skip" / "metrics.jsonl").read_text())
    assert record["skipped_steps"] == 2 and record["loss"] == record["loss"]  # finite mean
    state = load(tmp_path / "skip" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    trainer = Trainer(_quick(tmp_path / "stop", "train.skip_nonfinite=1"))
    trainer.objective = _PoisonedSteps(trainer.objective, {2, 4})
    with pytest.raises(NonFiniteLoss,
                       match=r"epoch 1, step 4: more than 1 such steps \(train.skip_nonfinite=1"):
        trainer.fit()
    assert not (tmp_path / "stop" / "last.pt").exists()


def _finite(tree: dict) -> bool:
    return all(torch.isfinite(v).all() for v in tree.values() if v.is_floating_point())


@pytest.mark.slow
def test_a_skipped_step_leaves_every_buffer_as_it_was(tmp_path):
    trainer = Trainer(_quick(tmp_path / "skip", "train.skip_nonfinite=2"))
    trainer.objective = _PoisonedImages(trainer.objective, {3})
    trainer.fit()
    state = load(tmp_path / "skip" / "last.pt")
    assert json.loads((tmp_path / "skip" / "metrics.jsonl").read_text())["skipped_steps"] == 1
    # BatchNorm running statistics of the model and the method's prior sums: all finite.
    assert _finite(state["model"]) and _finite(state["method"])
    assert _finite(load(tmp_path / "skip" / "best.pt")["model"])


@pytest.mark.slow
def test_skipping_more_than_half_an_epoch_stops_whatever_the_limit(tmp_path):
    trainer = Trainer(_quick(tmp_path / "run", "train.skip_nonfinite=1000"))
    trainer.objective = _PoisonedSteps(trainer.objective, {1, 2, 4})  # 3 of 5 steps
    with pytest.raises(NonFiniteLoss, match=r"step 4: more than 2 such steps .*at most 50% of "
                                            r"the epoch's 5 steps"):
        trainer.fit()
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_no_checkpoint_is_written_with_a_non_finite_tensor(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(_quick(out))
    trainer.fit()
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    with torch.no_grad():
        weight = next(trainer.model.parameters())
        weight[(0,) * weight.dim()] = float("inf")
    for save in (lambda: run_dir.save(trainer, {"val_robust_acc": 100.0}, best=True),
                 lambda: run_dir.save_partial(trainer, 1, {}, 0, 0, 0.0)):
        with pytest.raises(NonFiniteLoss, match=r"model\.\S+ holds NaN/inf .*refusing to write"):
            save()
    assert {name: (out / name).read_bytes() for name in before} == before


@pytest.mark.slow
def test_ctrl_c_saves_at_the_next_step_and_a_second_aborts(tmp_path):
    run = tmp_path / "run"
    once = _run(*COMMON, f"out_dir={run}", stop=("int", 3))
    assert once.returncode == EXIT_INTERRUPTED, once.stderr
    assert "Traceback" not in once.stderr and len(once.stderr.strip().splitlines()) == 2
    assert "epoch 1, step 3 of 5" in once.stderr and "--resume" in once.stderr
    assert load(run / "last.pt")["partial"]["step"] == 3
    assert not (run / "preempted.json").exists()  # a user's stop is not requeued

    twice = _run(*COMMON, f"out_dir={run}", "--resume", stop=("int2", 1))
    assert twice.returncode == EXIT_INTERRUPTED, twice.stderr
    assert "Traceback" not in twice.stderr and len(twice.stderr.strip().splitlines()) == 2
    assert "nothing saved" in twice.stderr
    assert load(run / "last.pt")["partial"]["step"] == 3  # aborted before saving again


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    fit(_quick(out))
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunError, match=r"could not write .*(best|last)\.pt \(disk full\); the "
                                       r"previous (best|last)\.pt is intact"):
        Trainer(_quick(out, "optim.epochs=2"), resume=True).fit()
    assert {name: (out / name).read_bytes() for name in before} == before
    # No temporary files; the lock file stays (it names the last writer).
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    torch.save({"format": 2, "epoch": 1, "extra": CodeOnLoad(marker)}, out / "last.pt")
    # In this process (the refusal comes before any training): at.train's main.
    assert main([*COMMON, f"out_dir={out}", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "cannot load checkpoint" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()
    # No advice to load it anyway (torch's own message suggests weights_only=False).
    assert "could execute code" in err and "can still be loaded" not in err
    (out / "last.pt").write_bytes(b"not a checkpoint at all")
    assert main([*COMMON, f"out_dir={out}", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "not a valid checkpoint" in err, err


class CallsSystem:
    """Unpickling this would run a shell command (torch names its module "blocked")."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_that_calls_a_function_is_refused_as_such(tmp_path, protocol):
    import pickle

    from at.checkpoint import CheckpointError
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    with open(path, "wb") as f:  # a plain pickle, as torch.save's legacy format writes
        pickle.dump({"format": 2, "extra": CallsSystem(marker)}, f, protocol=protocol)
    with pytest.raises(CheckpointError, match="refused, it is not a plain checkpoint of tensors"
                                              ".*could execute code") as err:
        load(path)
    assert protocol != 2 or "it names posix.system" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, monkeypatch, umask, mode):
    previous = os.umask(umask)
    try:
        # The umask is read once, when at.checkpoint is imported: read it as a process started
        # under this umask would.
        monkeypatch.setattr(checkpoint, "_UMASK", checkpoint._read_umask())
        checkpoint.atomic_write(tmp_path / "a.json", lambda f: f.write(b"{}"))
        checkpoint.atomic_save({}, tmp_path / "b.pt")
    finally:
        os.umask(previous)
    for name in ("a.json", "b.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
