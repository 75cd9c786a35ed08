"""Full and unwritable disks: torch's own error on a full disk is the one-line disk-full error, a
run whose first last.pt could not be written starts again with --resume, the evaluations and
bench.at_step check that they can write before computing and print a result they could not save,
and AutoAttack's log is refused before attacking when it cannot be opened, its later write
failures reported once."""
from __future__ import annotations

import errno
import io
import json
import os

import torch
from conftest import DIGITS

import models
from at import checkpoint
from at.train import main as train_main
from eval import pgd

# 200 training images; the 1,037 held out are validated clean only (PGD-0), the cheapest pass.
QUICK = ["attack.schedule=fixed", "attack.steps=1", "optim.epochs=1", "data.val_size=1037",
         "optim.batch_size=256", "eval.every=100", "eval.final_pgd=false", "eval.n_test=50",
         "eval.pgd_steps=0", "log.plot=false", "method.name=standard"]


class FullAfter(io.RawIOBase):
    """A file on a disk that fills up after `room` bytes: its writes then fail with ENOSPC, as
    the operating system's do (torch.save turns that into a RuntimeError of its own)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def fileno(self):
        return self.f.fileno()

    def flush(self):
        self.f.flush()

    def close(self):
        super().close()  # (flushes first)
        self.f.close()


def _one_line(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def _fill_disk(monkeypatch, part: str, room: int) -> None:
    """The atomic writes of at.checkpoint (a temporary file, then a rename) to a temporary file
    whose name holds `part` fill the disk after `room` bytes."""
    fdopen = os.fdopen

    def full_after_room(fd, *args, **kwargs):
        f = fdopen(fd, *args, **kwargs)
        return FullAfter(f, room=room) if part in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(checkpoint.os, "fdopen", full_after_room)


def test_a_full_disk_at_the_first_last_pt_is_one_line_and_recoverable(tmp_path, monkeypatch,
                                                                       capsys):
    out = tmp_path / "run"
    _fill_disk(monkeypatch, ".last.pt.", room=4096)
    code = train_main(["-c", str(DIGITS), *QUICK, f"out_dir={out}"])
    _one_line(capsys, code, f"could not write {out / 'last.pt'} (disk full)",
              "run again with --resume")
    monkeypatch.undo()
    left = sorted(p.name for p in out.iterdir())
    assert "best.pt" in left and "last.pt" not in left  # best.pt is written first
    assert not [n for n in left if n.endswith(".tmp")]
    # Space freed: --resume starts the run again (it has no checkpoint to resume).
    assert train_main(["-c", str(DIGITS), *QUICK, f"out_dir={out}", "--resume"]) == 0
    assert "starting from epoch 1" in capsys.readouterr().err
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def _checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "net.pt"
    torch.save(models.build_model("wrn-16-1", 10, dataset="digits").state_dict(), path)
    return path


def test_an_unwritable_results_folder_is_refused_before_computing(tmp_path, monkeypatch,
                                                                   capsys):
    path = _checkpoint(tmp_path)
    (tmp_path / "eval").write_text("a file where the results folder would go")

    def no_data(*args, **kwargs):
        raise AssertionError("the test data was loaded: the computation started")

    monkeypatch.setattr(pgd, "load_test_data", no_data)
    code = pgd.main([str(path), "--arch", "wrn-16-1", "--dataset", "digits", "--device", "cpu",
                     "--n-ex", "8", "--steps", "1"])
    _one_line(capsys, code, f"cannot write results to {tmp_path / 'eval'}")


def test_a_result_that_cannot_be_saved_is_printed(tmp_path, monkeypatch, capsys):
    path = _checkpoint(tmp_path)

    def full(text, where):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "write_text", full)  # under eval.common.write_result
    code = pgd.main([str(path), "--arch", "wrn-16-1", "--dataset", "digits", "--device", "cpu",
                     "--n-ex", "8", "--steps", "1"])
    out = capsys.readouterr()
    assert code == 1 and "Traceback" not in out.err and out.err.count("\n") == 1, out.err
    assert "(disk full); the result is printed on stdout above" in out.err
    result = json.loads(out.out)
    assert result["n_ex"] == 8 and 0 <= result["robust_acc"] <= result["clean_acc"]


def test_a_full_disk_while_saving_an_autoattack_chunk_is_one_line(tmp_path, monkeypatch, capsys):
    from eval import autoattack
    path = _checkpoint(tmp_path)

    def full(obj, where):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(autoattack.ckpt, "atomic_save", full)
    code = autoattack.main([str(path), "--arch", "wrn-16-1", "--dataset", "digits", "--device",
                            "cpu", "--n-ex", "4", "--attacks", "apgd-ce"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert "chunk_000000_000004.pt (No space left on device); the chunks saved before it are " \
           "kept" in err


def test_bench_refuses_an_unwritable_json_place_before_measuring(tmp_path, monkeypatch, capsys):
    from bench import at_step
    (tmp_path / "results").write_text("a file where the --json folder would go")

    def no_run(args):
        raise AssertionError("the benchmark ran: the check came too late")

    monkeypatch.setattr(at_step, "run", no_run)
    code = at_step.main(["--device", "cpu", "--json", str(tmp_path / "results" / "r.json")])
    _one_line(capsys, code, f"cannot write results to {tmp_path / 'results'}",
              "choose another --json")


def test_bench_prints_a_result_it_could_not_save(tmp_path, monkeypatch, capsys):
    """The disk fills between the check and the end: the figures come out on stdout."""
    from bench import at_step
    _fill_disk(monkeypatch, ".r.json.", room=0)
    code = at_step.main(["--config", str(DIGITS), "--device", "cpu", "--batch", "4",
                         "--attack-steps", "1", "--steps", "1", "--repeats", "1",
                         "--skip", "baseline,floor,attack,data", "--peak-size", "64",
                         "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr()
    last = out.err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in out.err, out.err
    assert last == f"bench.at_step: error: could not write {tmp_path / 'r.json'} (disk full); " \
                   f"the result is printed on stdout above", out.err
    result = json.loads(out.out[out.out.index("\n{") + 1:])
    assert result["ours"]["images_per_s"] > 0 and result["setup"]["num_classes"] == 10
    assert os.listdir(tmp_path) == []  # neither a result nor a half-written temporary file


AA = ["--arch", "wrn-16-1", "--dataset", "digits", "--device", "cpu", "--n-ex", "4",
      "--attacks", "apgd-ce"]
AA_NAME = "autoattack-standard-apgd-ce_linf_eps8-255_n4_net"  # result_name of that evaluation


def test_an_autoattack_log_that_cannot_be_opened_is_refused_before_attacking(tmp_path,
                                                                             monkeypatch,
                                                                             capsys):
    from eval import autoattack
    path = _checkpoint(tmp_path)
    (tmp_path / "eval" / f"{AA_NAME}.log").mkdir(parents=True)  # what root cannot write either

    def no_attack(*args, **kwargs):
        raise AssertionError("an attack ran before the log was opened")

    monkeypatch.setattr(autoattack, "attack_chunk", no_attack)
    code = autoattack.main([str(path), *AA])
    _one_line(capsys, code, f"cannot write the AutoAttack log {tmp_path / 'eval' / AA_NAME}.log "
              f"(Is a directory)", "results folder")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [f"{AA_NAME}.log"]


def test_a_log_the_disk_stops_taking_is_one_warning_and_the_result_is_kept(tmp_path,
                                                                           monkeypatch,
                                                                           capsys):
    import logging

    from eval import autoattack
    path = _checkpoint(tmp_path)

    def filling_log(self):  # the log's first 100 bytes fit on the disk, then ENOSPC
        return io.TextIOWrapper(FullAfter(open(self.baseFilename, "wb"), room=100),
                                write_through=True)

    monkeypatch.setattr(logging.FileHandler, "_open", filling_log)
    code = autoattack.main([str(path), *AA])
    out = capsys.readouterr()
    assert code == 0 and "Logging error" not in out.err and "Traceback" not in out.err, out.err
    assert out.err.count("warning: the log") == 1 and "(disk full)" in out.err, out.err
    result = json.loads((tmp_path / "eval" / f"{AA_NAME}.json").read_text())
    assert result["n_ex"] == 4 and f"-> {tmp_path / 'eval' / AA_NAME}.json" in out.out
    for name in ("eval.autoattack", "auto-attack"):  # the failing log goes with the test
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
            handler.close()
