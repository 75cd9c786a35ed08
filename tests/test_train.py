"""End to end: training learns robustness on real data, run directories are complete, a killed run
resumes to the same weights, and bad input stops with a one-line error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DIGITS, SMALL_RUN
from fake_cifar import write_fake_cifar

from at.checkpoint import CheckpointError, load, load_model_state
from at.config import REPO_ROOT, load_config
from at.train import main
from at.trainer import fit
from models import build_model

# A fast configuration for plumbing tests: one attack step, no per-epoch validation.
QUICK = ["attack.schedule=fixed", "attack.steps=1", "attack.step_size=8/255", "eval.every=100",
         "eval.final_pgd=false", "log.plot=false"]


def train_main(capsys, *args: str) -> tuple[int, str]:
    """`python -m at.train ARGS` in this process (no interpreter to start): the exit status and
    what it printed on stderr."""
    code = main(list(args))
    return code, capsys.readouterr().err


def model_state(run: Path) -> dict:
    return load(run / "last.pt")["model"]


def test_ikl_at_learns_accuracy_and_robustness(learned):
    ikl_dir, ikl = learned["ikl_at"]
    _, standard = learned["standard"]
    last = json.loads((ikl_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_clean_acc"] >= 80.0, last
    assert ikl["best"]["test_clean_acc"] >= 80.0, ikl
    # Same eps (8/255), same PGD-10: adversarial training must buy a large robustness margin.
    assert ikl["best"]["test_robust_acc"] >= standard["best"]["test_robust_acc"] + 20.0, \
        (ikl, standard)
    assert standard["best"]["test_clean_acc"] >= 80.0  # the comparison is with a working model


def test_run_directory_is_complete(learned):
    out, result = learned["ikl_at"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"]["name"] == "ikl_at" and len(config["_git"]["sha"]) in (7, 40) or \
        config["_git"]["sha"] == "unknown"
    assert isinstance(config["_git"]["dirty"], bool)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 9))
    for key in ("lr", "eps", "loss", "loss_ce", "loss_wmse", "loss_sce", "train_adv_acc",
                "train_clean_acc", "test_clean_acc", "train_seconds", "images_per_s"):
        assert all(key in r for r in records), key
    assert records[-1]["eps"] == pytest.approx(8 / 255)  # the eps ramp reaches eps at the end
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last, best = load(out / "last.pt"), load(out / "best.pt")
    assert last["epoch"] == 8 and best["epoch"] == result["best"]["epoch"]
    prior = last["method"]["prior"]
    torch.testing.assert_close(prior.sum(1), torch.ones(10))
    assert prior.diagonal().min() > 0.1  # learned from the model's predictions, not uniform
    assert json.loads((out / "final.json").read_text()) == result


@pytest.mark.slow
def test_fake_cifar_trains_through_the_real_loader(tmp_path):
    write_fake_cifar(str(tmp_path / "data"), "cifar100", n_train=96, n_test=40)
    cfg = load_config(REPO_ROOT / "configs" / "cifar100" / "ikl_at.yaml", [
        *QUICK, "model.name=wrn-16-1", "device=cpu", f"data.root={tmp_path / 'data'}",
        "data.download=false", "data.val_size=32", "optim.epochs=2", "optim.batch_size=32",
        f"out_dir={tmp_path / 'run'}"])
    result = fit(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[-1]["val_robust_acc"] is not None
    assert load(tmp_path / "run" / "last.pt")["method"]["prior"].shape == (100, 100)
    assert set(result) == {"last", "best", "avg"}  # the CIFAR-100 IKL-AT config averages weights


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    # Epoch 2 runs at lr * 1e30: the weights blow up within a few steps.
    code, err = train_main(capsys, "-c", str(DIGITS), *QUICK, *SMALL_RUN, "method.name=standard",
                           "optim.epochs=3", "optim.schedule=piecewise", "optim.milestones=[2]",
                           "optim.lr_decay=1e30", f"out_dir={out}")
    assert code == 1
    error = err.strip().splitlines()[-1]
    assert "non-finite" in error and "epoch 2, step" in error, err
    state = load(out / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("override,needle", [
    ("model.name=wrn-34-11", "unknown model (model.name) 'wrn-34-11'"),
    ("method.name=ikl", "unknown method (method.name) 'ikl'"),
    ("data.name=cifar1000", "unknown dataset"),
    ("optim.epoch=3", "unknown config key 'optim.epoch'"),
    ("eval.every=0", "eval.every and eval.batch_size must be >= 1"),
    ("attack.schedule=high", "attack.schedule must be one of"),
    ("eval.best_on=avg", "eval.best_on=avg needs weight averaging"),
    ("data.generated.path=nowhere", "data.generated.path=nowhere: no meta.json"),
    ("attack.eps=8", "attack.eps=8 must be < 1 under linf (pixels are in [0, 1]); did you mean "
                     "8/255?"),
    ("attack.norm=l2 attack.eps=60", "attack.eps=60 exceeds the l2 diameter"),
    ("method.name=trades data.second_view=cutout", "needs a method that weights the two views"),
])
def test_bad_names_give_one_line_errors(tmp_path, capsys, override, needle):
    code, err = train_main(capsys, "-c", str(DIGITS), *override.split(),
                           f"out_dir={tmp_path / 'run'}")
    assert code == 1
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_missing_dataset_names_the_expected_path(tmp_path, capsys):
    code, err = train_main(capsys, "data.name=cifar10", f"data.root={tmp_path}",
                           "data.download=false", "device=cpu", f"out_dir={tmp_path / 'run'}")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert str(tmp_path / "cifar-10-batches-py") in err


def test_out_dir_that_is_a_file_or_unwritable(tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    code, err = train_main(capsys, "-c", str(DIGITS), f"out_dir={tmp_path / 'file'}")
    assert code == 1 and "is a file, not a directory" in err, err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "file").read_text() == "keep me"
    # Below a file: no directory can be made there (what a read-only place gives too).
    code, err = train_main(capsys, "-c", str(DIGITS), f"out_dir={tmp_path / 'file' / 'run'}")
    assert code == 1 and "cannot write to out_dir" in err, err
    assert len(err.strip().splitlines()) == 1


def test_existing_out_dir_and_resume_without_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, err = train_main(capsys, "-c", str(DIGITS), f"out_dir={out}")
    assert code == 1 and "not empty" in err and "--resume" in err
    assert (out / "notes.txt").read_text() == "keep me"
    code, err = train_main(capsys, "-c", str(DIGITS), f"out_dir={out}", "--resume")
    assert code == 1 and "no last.pt" in err
    code, err = train_main(capsys, "-c", str(DIGITS), f"out_dir={tmp_path / 'nowhere'}",
                           "--resume")
    assert code == 1 and "no last.pt" in err
    # A run that died before its first checkpoint: the error says that --resume continues it.
    died = tmp_path / "died"
    died.mkdir()
    (died / "config.yaml").write_text("seed: 0\n")
    code, err = train_main(capsys, "-c", str(DIGITS), f"out_dir={died}")
    assert code == 1 and "stopped before its first checkpoint" in err
    assert "--resume" in err and (died / "config.yaml").read_text() == "seed: 0\n"


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    small = build_model("wrn-16-1", 10)
    with pytest.raises(CheckpointError, match="shape mismatch.*wrong architecture"):
        load_model_state(small, build_model("wrn-16-4", 10).state_dict(), "x.pt")
    with pytest.raises(CheckpointError, match="fc.weight"):
        load_model_state(small, build_model("wrn-16-1", 100).state_dict(), "x.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model_state(small, build_model("wrn-16-1-swish", 10).state_dict(), "x.pt")
    bad = tmp_path / "truncated.pt"
    torch.save({"model": small.state_dict()}, bad)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot load"):
        load(bad)


@pytest.mark.slow
def test_resume_of_a_run_that_died_before_its_first_checkpoint_starts_afresh(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    (out / "metrics.jsonl").write_text("")
    code, err = train_main(capsys, "-c", str(DIGITS), *QUICK, *SMALL_RUN, "method.name=standard",
                           "optim.epochs=1", f"out_dir={out}", "--resume")
    assert code == 0, err
    assert "starting from epoch 1" in err and load(out / "last.pt")["epoch"] == 1
    # A finished 1-epoch run resumed with fewer epochs than done: refused, overrides after
    # --resume accepted (intermixed).
    code, err = train_main(capsys, "-c", str(DIGITS), "--resume", *QUICK, *SMALL_RUN,
                           "method.name=standard", "optim.epochs=2", f"out_dir={out}")
    assert code == 0, err
    code, err = train_main(capsys, "-c", str(DIGITS), "--resume", *QUICK, *SMALL_RUN,
                           "method.name=standard", "optim.epochs=1", f"out_dir={out}")
    assert code == 1 and "has already done 2 epochs" in err, err
    assert "epochs: 2" in (out / "config.yaml").read_text()  # not rewritten


@pytest.mark.slow
def test_wandb_offline_logging_needs_no_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = load_config(DIGITS, [*QUICK, *SMALL_RUN, "method.name=standard", "optim.epochs=1",
                               "log.wandb=true", f"out_dir={out}"])
    fit(cfg)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


@pytest.mark.slow
def test_awp_and_weight_averaging_run_and_the_average_evaluates(tmp_path):
    from at.target import load_target
    from eval import load_model
    from eval.pgd import evaluate
    out = tmp_path / "run"
    cfg = load_config(DIGITS, [*QUICK, *SMALL_RUN, "optim.epochs=2", "awp.enabled=true",
                               "awp.warmup=2", "avg.kind=epoch_ema", f"out_dir={out}",
                               "eval.every=1", "eval.best_on=avg"])
    result = fit(cfg)
    assert set(result) == {"last", "best", "avg"}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("avg_val_robust_acc" in r for r in records)
    last, best = load(out / "last.pt"), load(out / "best.pt")
    assert last["avg"]["kind"] == "epoch_ema" and "avg" in best
    averaged = load_model(out, weights="avg")
    assert not averaged.training
    t = load_target(out, "avg", device="cpu")
    quick = evaluate(t, steps=5, n_ex=50)
    assert quick["weights"] == "avg" and (out / "eval" / "pgd5_linf_eps8-255_n50_avg.json").exists()
    torch.testing.assert_close(load_model(out, weights="avg").state_dict()["fc.weight"],
                               last["avg"]["model"]["fc.weight"])
    # eval.best_on=avg: best.pt is the epoch whose averaged weights validated best, and
    # `--weights best` evaluates those averaged weights.
    assert best["epoch"] == max(records, key=lambda r: r["avg_val_robust_acc"])["epoch"]
    torch.testing.assert_close(load_model(out, weights="best").state_dict()["fc.weight"],
                               best["avg"]["model"]["fc.weight"])


@pytest.mark.slow
def test_two_view_training_runs(tmp_path):
    out = tmp_path / "two_views"
    cfg = load_config(DIGITS, [*QUICK, *SMALL_RUN, "optim.epochs=1", "data.second_view=autoaugment",
                               "method.ikl_at.aug_weight=0.5", f"out_dir={out}"])
    fit(cfg)
    prior = load(out / "last.pt")["method"]["prior"]
    torch.testing.assert_close(prior.sum(1), torch.ones(10))


@pytest.mark.slow
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_epoch(tmp_path, capsys):
    # Nothing may depend on the total epoch count here (lr schedule, eps ramp): the damaged run
    # first trains for 2 epochs, then is extended to 3.
    common = ["-c", str(DIGITS), *QUICK, *SMALL_RUN, "method.name=standard",
              "optim.schedule=constant", "attack.eps_ramp=false"]
    code, err = train_main(capsys, *common, "optim.epochs=3", f"out_dir={tmp_path / 'straight'}")
    assert code == 0, err
    run = tmp_path / "damaged"
    code, err = train_main(capsys, *common, "optim.epochs=2", f"out_dir={run}")
    assert code == 0, err
    assert load(run / "last_prev.pt")["epoch"] == 1 and load(run / "last.pt")["epoch"] == 2
    damaged = (run / "last.pt").read_bytes()[:1000]  # e.g. a bad copy
    (run / "last.pt").write_bytes(damaged)
    # Resumed for one epoch (one save): the unreadable file is moved aside, not rotated into
    # last_prev.pt, where it would replace the only good fallback.
    code, err = train_main(capsys, *common, "optim.epochs=2", f"out_dir={run}", "--resume")
    assert code == 0, err
    assert "resuming from" in err and "last_prev.pt (epoch 1)" in err
    aside = list(run.glob("last.pt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged and str(aside[0]) in err
    assert load(run / "last_prev.pt")["epoch"] == 1 and load(run / "last.pt")["epoch"] == 2
    code, err = train_main(capsys, *common, "optim.epochs=3", f"out_dir={run}", "--resume")
    assert code == 0, err
    a, b = model_state(tmp_path / "straight"), model_state(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
