"""Evaluation: loading any checkpoint safely, AutoAttack <= PGD <= clean on a trained model,
chunked AutoAttack that resumes to the same totals, and the quick PGD / CW attacks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CodeOnLoad
from torch import nn

import eval as evaluation
from at.config import REPO_ROOT
from at.target import load_target, sha256
from attacks.accuracy import cw_margin
from eval import autoattack, pgd, summary
from eval.common import EvalError
from eval.robustbench_arch import architecture_module
from models import build_model


@pytest.fixture()
def ikl_run(learned, tmp_path):
    """A private copy of the digits IKL-AT run (evaluations write into it)."""
    run = tmp_path / "run"
    shutil.copytree(learned["ikl_at"][0], run, ignore=shutil.ignore_patterns("eval"))
    return run


def test_autoattack_is_below_pgd_and_clean(learned):
    # The standard-trained digits model: AutoAttack's cost on a CPU grows with the number of
    # points that survive its first stage (about 8 s each here), and this model has few.
    run = learned["standard"][0]
    t = load_target(run, "best", device="cpu")
    aa = autoattack.evaluate(t, n_ex=8, batch_size=64, progress=False)
    quick = pgd.evaluate(t, n_ex=8, steps=20)
    assert aa["robust_acc"] <= quick["robust_acc"] <= quick["clean_acc"] == aa["clean_acc"]
    assert aa["robust_acc"] < aa["clean_acc"]
    stages = [s["robust_acc"] for s in aa["stages"]]
    assert [s["attack"] for s in aa["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert stages == sorted(stages, reverse=True) and stages[-1] == aa["robust_acc"]
    saved = json.loads((t.out_dir / "autoattack-standard_linf_eps8-255_n8_best.json").read_text())
    assert saved == {k: v for k, v in aa.items() if k != "path"}
    assert saved["eps"] == "8/255" and saved["eps_float"] == pytest.approx(8 / 255)
    assert saved["version"] == "standard" and saved["norm"] == "Linf" and saved["n_ex"] == 8
    assert saved["full_test_set"] is False and saved["n_test"] == 360
    assert saved["checkpoint_sha256"] == sha256(run / "best.pt")
    assert saved["pyautoattack"] == "0.2.0" and saved["torch"] == torch.__version__
    for key in ("seed", "seconds", "device", "git"):
        assert key in saved
    log = (t.out_dir / "autoattack-standard_linf_eps8-255_n8_best.log").read_text()
    assert "robust accuracy after APGD-CE" in log and "images 0-8" in log


def test_chunked_autoattack_killed_after_a_chunk_resumes_to_the_same_totals(ikl_run, tmp_path):
    straight = tmp_path / "straight"
    shutil.copytree(ikl_run, straight)
    args = ["--n-ex", "32", "--chunk-size", "8", "--attacks", "apgd-ce", "--batch-size", "8",
            "--device", "cpu"]
    assert autoattack.main([str(straight), *args]) == 0

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "eval.autoattack", str(ikl_run), *args],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    chunks = ikl_run / "eval" / "autoattack-standard-apgd-ce_linf_eps8-255_n32_best_chunks"
    deadline = time.time() + 300
    while not list(chunks.glob("chunk_*.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the evaluation finished before it was killed"
    assert not list(chunks.glob("*.json"))

    assert autoattack.main([str(ikl_run), *args]) == 0  # resumed
    name = "autoattack-standard-apgd-ce_linf_eps8-255_n32_best.json"
    a = json.loads((straight / "eval" / name).read_text())
    b = json.loads((ikl_run / "eval" / name).read_text())
    assert b["chunks_reused"] >= 1 and a["chunks_reused"] == 0
    for key in ("clean_acc", "robust_acc", "stages", "n_ex", "version", "attacks"):
        assert a[key] == b[key], key
    assert a["version"] == "custom" and a["attacks"] == ["apgd-ce"]
    assert a["robust_acc"] < a["clean_acc"]  # the attack did something worth comparing


def test_corrupt_and_foreign_chunks_are_recomputed_not_trusted(ikl_run, caplog):
    t = load_target(ikl_run, "last", device="cpu")
    kwargs = dict(n_ex=8, chunk_size=4, attacks=["apgd-ce"], batch_size=4, progress=False)
    first = autoattack.evaluate(t, **kwargs)
    chunks = t.out_dir / "autoattack-standard-apgd-ce_linf_eps8-255_n8_last_chunks"
    files = sorted(chunks.glob("chunk_*.pt"))
    assert len(files) == 2
    files[0].write_bytes(files[0].read_bytes()[:50])        # truncated by a crash or a full disk
    foreign = torch.load(files[1], weights_only=True)
    foreign["fingerprint"]["seed"] = 123                     # another evaluation's result
    foreign["outcome"]["apgd-ce"] = ~foreign["outcome"]["apgd-ce"]
    torch.save(foreign, files[1])
    with caplog.at_level("WARNING", logger="eval.autoattack"):
        again = autoattack.evaluate(t, **kwargs)
    assert again["chunks_reused"] == 0
    assert sum("recomputing" in r.getMessage() for r in caplog.records) == 2
    for key in ("clean_acc", "robust_acc", "stages"):
        assert first[key] == again[key]
    third = autoattack.evaluate(t, **kwargs)
    assert third["chunks_reused"] == 2 and third["robust_acc"] == first["robust_acc"]
    # Another evaluation (eps, images) has its own chunks: it never replaces these.
    autoattack.evaluate(t, **{**kwargs, "n_ex": 4, "eps": "4/255"})
    assert autoattack.evaluate(t, **kwargs)["chunks_reused"] == 2


def test_autoattack_bad_arguments_give_one_line_errors(digits_run, capsys, monkeypatch):
    run = str(digits_run)
    for args, needle in ((["--n-ex", "1000"], "n_examples must be in [1, 360]"),
                         (["--version", "fast"], "unknown AutoAttack version 'fast'"),
                         (["--norm", "L3"], "unknown norm 'L3'"),
                         (["--eps", "8/0"], "cannot read eps"),
                         (["--eps", "8"], "--eps=8 must be < 1 under linf"),
                         (["--norm", "L2", "--eps", "56"], "--eps=56 exceeds the l2 diameter"),
                         (["--attacks", "fab"], "choose among"),
                         (["--weights", "avg"], "no weight-averaged model"),
                         (["--device", "gpu"], "unknown device 'gpu'")):
        assert autoattack.main([run, "--device", "cpu", *args]) == 1
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, (args, err)
    assert autoattack.main([str(digits_run / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    assert pgd.main([run, "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1, err


def test_pgd_and_cw_quick_attacks(learned):
    run = learned["ikl_at"][0]
    assert pgd.main([str(run), "--attack", "cw", "--steps", "10", "--n-ex", "64", "--device",
                     "cpu"]) == 0
    cw = json.loads((run / "eval" / "cw10_linf_eps8-255_n64_best.json").read_text())
    t = load_target(run, "best", device="cpu")
    ce = pgd.evaluate(t, steps=10, n_ex=64)
    assert (run / "eval" / "pgd10_linf_eps8-255_n64_best.json").exists()
    assert cw["clean_acc"] == ce["clean_acc"]
    assert cw["robust_acc"] < cw["clean_acc"] and ce["robust_acc"] < ce["clean_acc"]
    assert (cw["loss"], cw["steps"], cw["step_size"], cw["n_ex"]) == ("cw", 10, "2/255", 64)
    stronger = pgd.evaluate(t, steps=10, n_ex=64, eps="16/255")
    assert stronger["robust_acc"] <= ce["robust_acc"]


def test_a_quick_evaluation_never_replaces_the_full_one(ikl_run, capsys):
    t = load_target(ikl_run, "best", device="cpu")
    full = pgd.evaluate(t, steps=2)  # all 360 test images
    quick = pgd.evaluate(t, steps=2, n_ex=50, eps="4/255")
    assert sorted(p.name for p in (ikl_run / "eval").glob("*.json")) == [
        "pgd2_linf_eps4-255_n50_best.json", "pgd2_linf_eps8-255_n360_best.json"]
    assert json.loads(Path(full["path"]).read_text())["n_ex"] == 360
    assert json.loads(Path(quick["path"]).read_text())["n_ex"] == 50
    assert summary.main([str(ikl_run)]) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(r[4] for r in rows if r[1] == "PGD-2") == ["360", "50"]  # both kept
    assert sum(r[1:3] == ["PGD-10", "(final)"] for r in rows) == 2  # final.json's last and best


def test_cw_margin_is_positive_exactly_when_misclassified():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 1.5, -1.0]])
    y = torch.tensor([0, 1, 1])
    torch.testing.assert_close(cw_margin(logits, y), torch.tensor([-2.0, 3.0, -0.5]))


def _robustbench_class(file: str, name: str):
    module = architecture_module(file)
    if module is None:
        pytest.skip("robustbench is not installed (sh/test.sh installs it)")
    return getattr(module, name)


def test_load_model_accepts_run_dirs_and_foreign_checkpoints(learned, tmp_path):
    run = learned["ikl_at"][0]
    x = torch.rand(4, 3, 32, 32)
    best = evaluation.load_model(run)
    assert not best.training and not any(m.training for m in best.modules())
    last = evaluation.load_model(run, weights="last")
    with torch.no_grad():
        reference = best.cpu()(x)
        assert not torch.equal(reference, last.cpu()(x)) or \
            learned["ikl_at"][1]["best"]["epoch"] == learned["ikl_at"][1]["last"]["epoch"]
    # Someone else's RobustBench-format checkpoint: their class, their wrapper, DataParallel and
    # torch.compile prefixes.
    theirs = _robustbench_class("wide_resnet", "WideResNet")(depth=16, widen_factor=1,
                                                                num_classes=10).eval()
    state = {f"module._orig_mod.{k}": v for k, v in theirs.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "theirs.pt")
    ours = evaluation.load_model(tmp_path / "theirs.pt", arch="wrn-16-1", dataset="cifar10")
    with torch.no_grad():
        torch.testing.assert_close(ours.cpu()(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_load_model_refuses_mismatched_or_incomplete_requests(digits_run, tmp_path):
    run = digits_run
    path = tmp_path / "w.pt"
    torch.save(build_model("wrn-16-1", 10).state_dict(), path)
    with pytest.raises(EvalError, match="shape mismatch: block1"):
        evaluation.load_model(path, arch="wrn-16-4", dataset="cifar10")
    # A bare checkpoint of another number of classes is named as one of another dataset.
    with pytest.raises(EvalError, match="has 10 outputs, but a cifar100 model has 100"):
        evaluation.load_model(path, arch="wrn-16-1", dataset="cifar100")
    with pytest.raises(EvalError, match="missing keys: init_conv.weight"):
        evaluation.load_model(path, arch="wrn-16-1-swish", dataset="cifar10")
    with pytest.raises(EvalError, match="give --arch and --dataset"):
        evaluation.load_model(path)
    with pytest.raises(EvalError, match="contradicts the run's arch wrn-16-1"):
        evaluation.load_model(run, arch="wrn-34-10")
    with pytest.raises(EvalError, match="unknown weights"):
        evaluation.load_model(run, weights="ema")
    with pytest.raises(EvalError, match="does not exist"):
        evaluation.load_model(tmp_path / "nothing")


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    state = build_model("wrn-16-1", 10).state_dict()
    torch.save({"model": state, "extra": CodeOnLoad(marker)}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(EvalError, match="cannot load checkpoint"):
        evaluation.load_model(tmp_path / "evil.pt", arch="wrn-16-1", dataset="cifar10")
    assert not marker.exists()
    assert autoattack.main([str(tmp_path / "evil.pt"), "--arch", "wrn-16-1", "--dataset",
                            "digits", "--n-ex", "4"]) == 1
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_models_are_evaluated_in_float32_eval_mode(digits_run):
    t = load_target(digits_run, "best", device="cpu")
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) and m.training for m in t.model.modules())


def test_summary_shows_final_json_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("attack:\n  eps: 0.03137254901960784\n  norm: linf\n"
                                     "eval:\n  pgd_steps: 10\n")
    # final.json as earlier versions wrote it (no eps in the rows): eps from config.yaml
    (run / "final.json").write_text(json.dumps({
        "last": {"epoch": 2, "test_clean_acc": 90.0, "test_robust_acc": 50.0},
        "best": {"epoch": 1, "test_clean_acc": 91.0, "test_robust_acc": 51.0, "eps": 8 / 255,
                 "norm": "linf", "pgd_steps": 10, "n_test": 360}}))
    assert summary.main([str(run)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[:5] for r in rows] == [["last", "PGD-10", "(final)", "8/255", "Linf"],
                                             ["best", "PGD-10", "(final)", "8/255", "Linf"]]
    (run / "eval").mkdir()
    (run / "eval" / "pgd20_linf_eps8-255_n360_best.json").write_text('{"robust_acc": 1')
    assert summary.main([str(run)]) == 1
    err = capsys.readouterr().err
    assert "pgd20_linf_eps8-255_n360_best.json is unreadable" in err and err.count("\n") == 1
    assert summary.main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'missing'} is not a directory" in err and err.count("\n") == 1
