"""One writer per run directory, sweep root and AutoAttack chunk (at/lock.py): a second process is
refused with a one-line error naming the first one's pid and host, and the lock of a killed
process is gone with it (the operating system releases it)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DIGITS

import models
from at import sweep
from at.config import REPO_ROOT
from at.lock import LOCK_FILE, Busy, acquire
from at.target import load_target
from at.train import main as train_main
from eval import autoattack
from eval.precision import evaluation_precision

QUICK = ["attack.schedule=fixed", "attack.steps=1", "optim.epochs=1", "data.val_size=1037",
         "optim.batch_size=256", "eval.every=100", "eval.final_pgd=false", "eval.n_test=50",
         "eval.pgd_steps=1", "log.plot=false", "method.name=standard"]


class Holder:
    """Another process holding the lock file `path` until it is stopped."""

    def __init__(self, path: Path):
        code = ("import sys; from at.lock import acquire; "
                "held = acquire(sys.argv[1], 'x', 'holder'); print('held', flush=True); "
                "sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO_ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)  # no clean-up of its own: the OS releases it
        self.proc.wait(timeout=60)


def _names_holder(err: str, holder: Holder) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"pid {holder.proc.pid} on host {socket.gethostname()}" in err, err


def test_a_second_training_process_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = Holder(out / LOCK_FILE)
    try:
        assert train_main(["-c", str(DIGITS), *QUICK, f"out_dir={out}"]) == 1
        err = capsys.readouterr().err
        _names_holder(err, holder)
        assert f"out_dir {out} is in use" in err
        assert train_main(["-c", str(DIGITS), *QUICK, f"out_dir={out}", "--resume"]) == 1
        _names_holder(capsys.readouterr().err, holder)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()
    assert train_main(["-c", str(DIGITS), *QUICK, f"out_dir={out}"]) == 0
    assert (out / "final.json").is_file()
    acquire(out / LOCK_FILE, "x", "test").release()  # released when the run ended


def test_a_refused_claim_of_a_new_directory_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "new"
    assert train_main(["-c", str(DIGITS), *QUICK, f"out_dir={out}", "--resume"]) == 1
    assert "--resume: no last.pt" in capsys.readouterr().err
    assert not out.exists()


def test_a_second_sweep_on_a_root_is_refused(tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"base": str(DIGITS), "seeds": [0],
                                    "out_root": str(root)}))
    holder = Holder(root / LOCK_FILE)
    try:
        assert sweep.main([str(spec)]) == 1
        err = capsys.readouterr().err
        _names_holder(err, holder)
        assert f"out_root {root} is in use" in err
        assert not (root / sweep.STATE_FILE).exists()
    finally:
        holder.kill()


def _bare_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(models.build_model("wrn-16-1", 10, dataset="digits").state_dict(), path)
    return path


@evaluation_precision()
def test_an_autoattack_chunk_has_one_writer(tmp_path):
    t = load_target(_bare_checkpoint(tmp_path), "best", "wrn-16-1", "digits", device="cpu")
    args = dict(n_ex=8, chunk_size=4, attacks=["apgd-ce"], batch_size=4, progress=False)
    name = "autoattack-standard-apgd-ce_linf_eps8-255_n8_model"
    chunk = t.out_dir / f"{name}_chunks" / "chunk_000004_000008.pt"
    chunk.parent.mkdir(parents=True)
    holder = Holder(chunk.with_name(chunk.name + ".lock"))
    try:
        with pytest.raises(Busy, match=rf"chunk .*{chunk.name} is in use by pid "
                                       rf"{holder.proc.pid} on host"):
            autoattack.evaluate(t, **args)
        assert (chunk.parent / "chunk_000000_000004.pt").is_file()  # the free one was done
        assert not chunk.exists()
    finally:
        holder.kill()
    assert autoattack.evaluate(t, **args)["n_ex"] == 8


def test_a_file_system_without_locks_is_named(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    held = acquire(tmp_path / LOCK_FILE, f"out_dir {tmp_path}", "at.train")
    err = capsys.readouterr().err
    assert "does not support file locks" in err and "nothing stops a second process" in err
    held.release()
