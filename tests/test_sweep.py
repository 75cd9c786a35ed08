"""Sweeps (at.sweep), the multi-run summary (eval.summary) and early stopping.

The end-to-end test trains a real digits sweep (2 points x 2 seeds, 1 epoch, the smallest model,
plain training so that it stays cheap), stops it by a signal after the first run, starts it again,
and checks that the result equals an uninterrupted sweep's, weight for weight. The uninterrupted
sweep is trained in two steps (one seed, then a spec that adds the second and corrects the
target), each run in one go: the same runs also show that such a spec continues a sweep."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch
import yaml
from conftest import train_in_process

from at import sweep
from at.checkpoint import load
from at.config import REPO_ROOT, load_config
from at.early_stop import EarlyStop
from at.trainer import fit
from eval import summary

DIGITS = REPO_ROOT / "configs" / "digits" / "ikl_at.yaml"
# Cheapest real runs: plain training for one epoch, PGD-1 validation, 100 test images per epoch.
CHEAP = {"method.name": "standard", "optim.epochs": 1, "optim.batch_size": 256,
         "eval.pgd_steps": 1, "eval.n_test": 100, "log.plot": False}
# A made-up target with the 0.031 radius some papers evaluated at (runs train at 8/255).
TARGET = {"reported.clean": 95.0, "reported.autoattack": 50.0, "reported.norm": "linf",
          "reported.eps": 0.031, "reported.source": "a test target"}
CORRECTED = {**TARGET, "reported.clean": 96.5}  # the target of the sweeps' final specs
CHILD_ENV = {"CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
             "MPLBACKEND": "Agg"}
ENV = {**os.environ, **CHILD_ENV}
TIMING = ("train_seconds", "eval_seconds", "images_per_s")


def write_spec(path: Path, root: Path, **fields) -> Path:
    spec = {"base": str(DIGITS), "overrides": {**CHEAP, **TARGET},
            "grid": {"optim.lr": [0.05, 0.1]}, "seeds": [0, 1], "out_root": str(root), **fields}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _train_here(child, cmd: list[str]) -> int:
    """A sweep's `python -m at.train ARGS` command run in this process, on one thread as the
    command's environment asks (OMP_NUM_THREADS=1)."""
    assert cmd[1:3] == ["-m", "at.train"], cmd
    return train_in_process(cmd[3:])


def run_sweep(*args: str, train_here: bool = False) -> subprocess.CompletedProcess:
    """`python -m at.sweep ARGS` in this process (no interpreter to start for the sweep itself;
    its training and evaluation commands are processes of their own, or with `train_here` the
    training commands run in this process too): the exit status and what the sweep printed."""
    out, err = StringIO(), StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out), redirect_stderr(err):
        mp.chdir(REPO_ROOT)
        for key, value in CHILD_ENV.items():
            mp.setenv(key, value)
        if train_here:
            mp.setattr(sweep._Child, "run", _train_here)
        code = sweep.main(list(args))
    return subprocess.CompletedProcess(["at.sweep", *args], code, out.getvalue(), err.getvalue())


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The same runs twice: a sweep stopped after its first run and restarted, and one whose
    runs each trained in one go (a first spec with seed 0, then a spec adding seed 1 and
    correcting the target)."""
    tmp = tmp_path_factory.mktemp("sweeps")
    names = ["lr0.05_seed0", "lr0.05_seed1", "lr0.1_seed0", "lr0.1_seed1"]
    # The stopped sweep also evaluates each run (PGD-1 on 20 images): the evaluations must be
    # neither lost nor repeated; evaluations are not part of the spec hash.
    stopped = write_spec(tmp / "stopped.yaml", tmp / "a", overrides={**CHEAP, **CORRECTED},
                         eval=[{"pgd": ["--steps", "1", "--n-ex", "20", "--device", "cpu"]}])
    # The real entry point as its own process: it is stopped by a signal.
    proc = subprocess.Popen([sys.executable, "-m", "at.sweep", str(stopped)], cwd=REPO_ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (tmp / "a" / names[1] / "config.yaml").exists():  # the second run has started
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # as Slurm does before a time limit or on preemption
    out, _ = proc.communicate(timeout=600)
    first = {"code": proc.returncode, "out": out,
             "unfinished": [n for n in names if not (tmp / "a" / n / "final.json").exists()]}
    again = run_sweep(str(stopped))
    third = run_sweep(str(stopped))
    # The reference's runs train in this process (no interpreter and imports to start for
    # each): the stopped sweep's, which are compared with them, are the real processes.
    one_seed = run_sweep(str(write_spec(tmp / "one_seed.yaml", tmp / "b", seeds=[0])),
                         train_here=True)
    seed0 = {n: (tmp / "b" / n / "best.pt").read_bytes() for n in names if n.endswith("seed0")}
    whole = run_sweep(str(write_spec(tmp / "whole.yaml", tmp / "b",
                                     overrides={**CHEAP, **CORRECTED})), train_here=True)
    return {"tmp": tmp, "names": names, "first": first, "again": again, "third": third,
            "one_seed": one_seed, "seed0_weights": seed0, "whole": whole}


def test_a_stopped_sweep_continues_to_the_same_runs_as_an_uninterrupted_one(sweeps):
    first, again, third, whole = (sweeps[k] for k in ("first", "again", "third", "whole"))
    assert first["code"] == 75, first["out"]  # stopped by the signal, resumable
    assert len(first["unfinished"]) >= 3, first  # it really stopped early (in the second run)
    assert again.returncode == 0 and whole.returncode == 0, again.stderr + whole.stderr
    assert "lr0.05_seed0: finished, skipped" in again.stdout
    # A third start has nothing left to do: no training, no evaluation.
    assert third.returncode == 0 and third.stdout.count("finished, skipped") == 4, third.stdout
    assert "eval.pgd" not in third.stdout
    tmp = sweeps["tmp"]
    for name in sweeps["names"]:
        a, b = tmp / "a" / name, tmp / "b" / name
        state_a, state_b = load(a / "last.pt")["model"], load(b / "last.pt")["model"]
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), name
        assert records(a) == records(b), name
        assert json.loads((a / "final.json").read_text()) == \
            json.loads((b / "final.json").read_text())
        # Each evaluation ran exactly once: its result and the sweep's note of it.
        assert len(list((a / "eval").glob("pgd1_*_best.json"))) == 1
        assert len(json.loads((a / sweep.EVAL_MARKER).read_text())) == 1
        cfg = yaml.safe_load((a / "config.yaml").read_text())
        assert cfg["seed"] == int(name[-1]) and cfg["reported"]["eps"] == 0.031  # recorded
    # Different spec files, the same runs: the same hash.
    assert json.loads((tmp / "a" / "sweep.json").read_text())["hash"] == \
        json.loads((tmp / "b" / "sweep.json").read_text())["hash"]


def test_summary_groups_seeds_ranks_on_validation_and_compares_with_the_target(sweeps, capsys):
    root = sweeps["tmp"] / "b"
    assert summary.main([str(root), "--format", "json"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    groups = doc["groups"]
    assert doc["differing_keys"] == ["optim.lr"] and [g["n"] for g in groups] == [2, 2]
    val = [g["val_pgd_best_mean"] for g in groups]
    assert val == sorted(val, reverse=True)  # ranked by validation robust accuracy
    for g in groups:
        runs = [json.loads((Path(r) / "final.json").read_text())["best"] for r in g["runs"]]
        clean = [r["test_clean_acc"] for r in runs]
        assert g["test_clean_mean"] == pytest.approx(sum(clean) / 2)
        assert g["test_clean_std"] == pytest.approx(abs(clean[0] - clean[1]) / 2 ** 0.5)
        # Our 1-epoch runs are far below the 96.5 % target: a gap beyond the seed spread.
        assert g["gap_clean"] == pytest.approx(g["test_clean_mean"] - 96.5)
        assert g["gap_clean_beyond_spread"] is (abs(g["gap_clean"]) > g["test_clean_std"])
        assert g["gap_autoattack"] == pytest.approx(g["test_pgd_mean"] - 50.0)  # PGD stands in
    # Training at 8/255 against a target evaluated at 0.031: warned, once per run.
    warnings = [w for w in out.err.splitlines() if "warning" in w]
    assert len(warnings) == 4 and all("0.031" in w and "8/255" in w for w in warnings)
    png = sweeps["tmp"] / "sweep.png"
    assert summary.main([str(root), "--plot", str(png)]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [r for r in table if r.startswith("| 1 ") or r.startswith("| 2 ")]
    assert len(rows) == 2 and all(r.count(" ± ") >= 4 for r in rows), table
    assert "96.50 / 50.00" in rows[0] and "**" in table[2]  # target shown, gap flagged
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary.main([str(root / "lr0.1_seed0"), str(root / "lr0.1_seed1"), "--format",
                         "csv"]) == 0
    csv_lines = capsys.readouterr().out.splitlines()
    assert csv_lines[0].startswith("rank,n,runs,seeds,val_pgd_best_mean") and len(csv_lines) == 2


def test_summary_reads_autoattack_and_audit_and_warns_on_their_eps(sweeps, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(sweeps["tmp"] / "b", root)
    for i, run in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        (run / "eval").mkdir(exist_ok=True)
        # What eval.autoattack and eval.audit write (the fields the summary reads), evaluated at
        # the 0.031 of the TRADES / LBGAT code instead of the training radius 8/255.
        (run / "eval" / "aa_standard_linf_eps0.031_n100_best.json").write_text(json.dumps({
            "clean_acc": 12.0, "robust_acc": float(i), "n_ex": 100, "eps": "0.031",
            "eps_float": 0.031, "norm": "Linf", "version": "standard", "weights": "best"}))
        (run / "eval" / "audit_best.json").write_text(json.dumps(
            {"verdict": "pass" if i < 2 else "suspicious"}))
    assert summary.main([str(root), "--format", "json"]) == 0
    out = capsys.readouterr()
    groups = {g["optim.lr"]: g for g in json.loads(out.out)["groups"]}
    assert groups[0.05]["autoattack_mean"] == 0.5 and groups[0.1]["autoattack_mean"] == 2.5
    assert groups[0.05]["audit"] == ["pass"] and groups[0.1]["audit"] == ["suspicious"]
    # AutoAttack now stands for the robust target, not PGD.
    assert groups[0.1]["gap_autoattack"] == pytest.approx(2.5 - 50.0)
    warnings = [w for w in out.err.splitlines() if "but AutoAttack is at eps 0.031" in w]
    assert len(warnings) == 4


def test_print_and_slurm(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", tmp_path / "root",
                      eval=["audit", {"autoattack": "--n-ex 100"}])
    assert sweep.main([str(spec), "--print"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12 and not (tmp_path / "root").exists()  # --print writes nothing
    train = shlex.split(lines[0])
    assert train[:5] == ["python", "-m", "at.train", "-c", str(DIGITS)]
    assert "optim.lr=0.05" in train and "seed=0" in train
    assert f"out_dir={tmp_path / 'root' / 'lr0.05_seed0'}" in train
    assert shlex.split(lines[1])[2:] == ["eval.audit", str(tmp_path / "root" / "lr0.05_seed0")]
    assert shlex.split(lines[2])[2:] == ["eval.autoattack",
                                         str(tmp_path / "root" / "lr0.05_seed0"), "--n-ex", "100"]
    # The commands reproduce the configs the sweep resolved.
    cfg = load_config(DIGITS, train[5:])
    assert cfg["optim"]["lr"] == 0.05 and cfg["reported"]["clean"] == 95.0
    assert sweep.main([str(spec), "--slurm"]) == 0
    script = tmp_path / "root" / "sweep.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text and "#SBATCH --requeue" in text
    assert text.count("slurm_train ") == 1 and "--eval-only" in text
    assert "#SBATCH --signal=B:TERM@300" in text  # to the batch shell, which passes it on
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    capsys.readouterr()


def test_a_root_of_another_spec_is_refused_unless_resume(tmp_path, capsys):
    root = tmp_path / "root"
    assert sweep.main([str(write_spec(tmp_path / "a.yaml", root)), "--slurm"]) == 0
    state = (root / "sweep.json").read_text()
    # Another spec: it drops the lr0.1 runs (adding runs alone would continue the sweep).
    other = write_spec(tmp_path / "b.yaml", root, grid={"optim.lr": [0.05, 0.2]})
    capsys.readouterr()
    one_line_error(capsys, sweep.main([str(other), "--slurm"]), str(root), "another spec",
                   "--resume")
    assert (root / "sweep.json").read_text() == state  # nothing overwritten
    assert sweep.main([str(other), "--slurm", "--resume"]) == 0
    assert json.loads((root / "sweep.json").read_text())["runs"][-1] == "lr0.2_seed1"
    # A root holding plain runs that no spec recorded is another spec's too.
    plain = tmp_path / "plain"
    (plain / "somerun").mkdir(parents=True)
    (plain / "somerun" / "config.yaml").write_text("seed: 0\n")
    capsys.readouterr()
    one_line_error(capsys, sweep.main([str(write_spec(tmp_path / "c.yaml", plain)), "--slurm"]),
                   "somerun")


def _finished(spec_path: Path, name: str) -> Path:
    """Run `name` of the spec as a finished run on disk (its config.yaml and final.json, as
    at.train writes them)."""
    from at.config import dump_config
    spec = sweep.load_spec(spec_path)
    run = next(r for r in sweep.expand(spec) if r.name == name)
    run.out_dir.mkdir(parents=True)
    dump_config(run.config, run.out_dir / "config.yaml")
    (run.out_dir / "final.json").write_text("{}")
    return run.out_dir


def test_a_refused_command_leaves_the_sweep_state_as_it_was(tmp_path, capsys):
    root = tmp_path / "root"
    mine = write_spec(tmp_path / "a.yaml", root)
    assert sweep.main([str(mine), "--slurm"]) == 0
    _finished(mine, "lr0.05_seed0")
    state = (root / "sweep.json").read_text()
    # --resume with another spec, refused because a finished run trained something else:
    # sweep.json still records the first spec, which therefore continues as before.
    other = write_spec(tmp_path / "b.yaml", root, overrides={**CHEAP, **TARGET,
                                                             "optim.momentum": 0.8})
    capsys.readouterr()
    one_line_error(capsys, sweep.main([str(other), "--slurm", "--resume"]), "lr0.05_seed0",
                   "momentum")
    assert (root / "sweep.json").read_text() == state
    assert sweep.main([str(mine), "--slurm"]) == 0


def test_an_out_root_inside_a_run_directory_is_refused(tmp_path, capsys):
    run = _finished(write_spec(tmp_path / "a.yaml", tmp_path / "root"), "lr0.1_seed1")
    spec = write_spec(tmp_path / "b.yaml", tmp_path / "root")
    capsys.readouterr()
    one_line_error(capsys, sweep.main([str(spec), "--slurm", "--out-root", str(run / "sub")]),
                   f"inside the run directory {run}")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "final.json"]


def test_adding_a_seed_or_correcting_the_target_continues_the_sweep(sweeps):
    one_seed, whole, root = sweeps["one_seed"], sweeps["whole"], sweeps["tmp"] / "b"
    assert one_seed.returncode == 0 and whole.returncode == 0, one_seed.stderr + whole.stderr
    for i, name in enumerate(sweeps["names"], 1):
        if name.endswith("seed0"):
            assert f"[{i}/4] {name}: finished, skipped" in whole.stdout, whole.stdout
            assert f"{name}: reported: target updated" in whole.stdout, whole.stdout
            # Not trained again.
            assert (root / name / "best.pt").read_bytes() == sweeps["seed0_weights"][name]
        else:
            assert f"[{i}/4] {name}: training" in whole.stdout, whole.stdout
            assert (root / name / "final.json").is_file()
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        assert config["reported"]["clean"] == 96.5  # the corrected target, in all of them


@pytest.mark.parametrize("fields, needles", [
    ({"grid": {"optim.lrr": [0.1]}}, ["'optim.lrr'", "unknown grid key", "'optim.lr'"]),
    ({"grid": {}}, ["empty grid"]),
    ({"grid": {"optim.lr": []}}, ["'optim.lr'", "empty grid"]),
    ({"grid": {"optim.lr": {"range": [0.3, 0.1, 0.1]}}}, ["'optim.lr'", "empty grid"]),
    ({"grid": {"optim.lr": [0.1, 0.1000000001]}}, ["same directory name", "'lr0.1'"]),
    ({"overrides": {"reported.clen": 1}}, ["'clen'", "reported"]),
    ({"grid": {"seed": [1, 2]}}, ["'seed'", "seeds"]),
    ({"grid": {"optim": [1]}}, ["'optim'", "section"]),
    ({"eval": ["pgdd"]}, ["'pgdd'", "pgd, autoattack, audit"]),
    ({"random": {"samples": 2, "params": {"optim.momentum": {"gaussian": [0, 1]}}}},
     ["'optim.momentum'", "log_uniform"]),
    ({"random": {"samples": 2, "params": {"optim.lr": [0.1]}}}, ["'optim.lr'", "both"]),
    ({"colour": "red"}, ["'colour'", "unknown spec field"]),
    # Every run's config is checked before the first run starts.
    ({"grid": {"model.name": ["wrn-16-1", "wrn-99-9"]}}, ["wrn-99-9", "unknown model"]),
    ({"grid": {"data.name": ["digits", "mnistt"]}}, ["'mnistt'", "unknown dataset"]),
    ({"overrides": TARGET, "grid": {"method.name": ["ikl_at", "IKL_AT"]}},
     ["'IKL_AT'", "unknown method"]),
    ({"seeds": [-1]}, ["run lr0.05_seed-1", "numpy's range"]),
    ({"random": {"samples": 2, "seed": "abc", "params": {"optim.momentum": [0.8, 0.9]}}},
     ["random.seed must be an integer", "'abc'"]),
    ({"random": {"samples": 2, "params": {"train.skip_nonfinite": {"randint": [1.5, 3.7]}}}},
     ["'train.skip_nonfinite'", "randint takes two integers"]),
    ({"random": {"samples": 3, "params": {"optim.momentum": [0.8, 0.9]}}},
     ["3 samples asked", "too few points"]),
    ({"slurm": {"time": "1:00\nrm -rf x"}}, ["slurm.time", "one non-empty line"]),
    ({"slurm": {"time": ["1:00", "2:00"]}}, ["slurm.time", "one string or number"]),
    ({"slurm": {"mem": None}}, ["slurm.mem has no value"]),
    ({"slurm": {"mem 4G": 1}}, ["'mem 4G'", "not an sbatch option name"]),
])
def test_bad_specs_are_one_line_errors_naming_the_problem(tmp_path, capsys, fields, needles):
    spec = write_spec(tmp_path / "s.yaml", tmp_path / "root", **fields)
    one_line_error(capsys, sweep.main([str(spec), "--print"]), *needles)
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("mode", [[], ["--slurm"]])
def test_bad_eval_arguments_are_refused_before_anything_is_written(tmp_path, capsys, mode):
    """Found by the eval's own parser before the first run trains, not after it."""
    spec = write_spec(tmp_path / "s.yaml", tmp_path / "root", grid={"optim.lr": [0.05]},
                      seeds=[0], eval=[{"autoattack": "--n-ex 4 --attacks apgd-ce"},
                                       {"pgd": ["--steps", "1", "--stepz", "5"]}])
    one_line_error(capsys, sweep.main([str(spec), *mode]),
                   f"at.sweep: error: {spec}: eval pgd: unrecognized arguments: --stepz 5")
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("module, args, needle", [
    ("eval.pgd", ["--stepz", "5"], "unrecognized arguments: --stepz 5"),
    ("eval.autoattack", ["--n-ex", "abc"], "argument --n-ex: invalid int value: 'abc'"),
    ("eval.audit", ["--eps", "-1"], "eps must be a finite number >= 0, got '-1'"),
    ("eval.pgd", ["--eps", "8"], "--eps=8 must be < 1 under linf"),
    ("eval.pgd", ["--steps", "0"], "--steps must be >= 1"),
    ("eval.pgd", ["--attack", "fgsm"], "unknown attack 'fgsm'"),
    ("eval.autoattack", ["--attacks", "apgd-x"], "choose among those"),
    ("eval.autoattack", ["--version", "fast"], "unknown AutoAttack version 'fast'"),
    ("eval.autoattack", ["--norm", "L3"], "unknown norm 'L3'"),
    ("eval.audit", ["--sweep", "0,8/255,8"], "--sweep=8 must be < 1 under linf"),
    ("eval.audit", ["--eps", "0"], "an audit needs a radius > 0"),
    ("eval.audit", ["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    # What the sweep sets itself: the run directory (its model, dataset and results folder).
    ("eval.pgd", ["runs/other"], "unrecognized arguments: runs/other"),
    ("eval.pgd", ["--arch", "wrn-16-1"], "--arch is what the run directory settles"),
    ("eval.autoattack", ["--out", "results"], "--out is what the run directory settles"),
    ("eval.autoattack", ["--shard", "0/2"], "--shard cannot be given here"),
    ("eval.audit", ["--help"], "-h/--help prints the help"),
])
def test_eval_arguments_are_checked_by_each_commands_own_parser(capsys, module, args, needle):
    from eval import arguments
    problem = arguments.problem(module, args)
    assert problem is not None and needle in problem and "\n" not in problem, problem
    assert capsys.readouterr() == ("", "")  # nothing printed: no usage, no help


def test_good_eval_arguments_pass_the_check():
    from eval import arguments
    for module, args in [("eval.pgd", ["--steps", "20", "--attack", "cw", "--eps", "8/255"]),
                         ("eval.autoattack", ["--n-ex", "1000", "--weights", "best",
                                              "--attacks", "apgd-ce,apgd-t"]),
                         ("eval.audit", ["--quick", "--norm", "L2", "--eps", "0.5",
                                         "--surrogate", "runs/standard"])]:
        assert arguments.problem(module, args) is None, (module, args)


def test_nested_overrides_and_colliding_random_draws(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", tmp_path / "root",
                                      overrides={**CHEAP, "optim": {"momentum": 0.8}}))
    assert all(r.config["optim"]["momentum"] == 0.8 for r in sweep.expand(spec))
    # Five draws from three values: the repeated draws are drawn again, all points distinct.
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base": str(DIGITS), "out_root": str(tmp_path / "root"),
                                    "random": {"samples": 3, "seed": 0, "params": {
                                        "optim.momentum": [0.7, 0.8, 0.9]}}}))
    spec = sweep.load_spec(path)
    values = sorted({r.config["optim"]["momentum"] for r in sweep.expand(spec)})
    assert values == [0.7, 0.8, 0.9]


def test_ranges_random_search_and_names_are_stable(tmp_path):
    spec = sweep.load_spec(write_spec(
        tmp_path / "s.yaml", tmp_path / "root", seeds=[3],
        grid={"optim.lr": {"range": [0.1, 0.3, 0.1]}, "method.trades.beta": [6],
              "method.ikl_at.beta": {"log_range": [1, 100, 3]}},
        random={"samples": 3, "seed": 7, "params": {
            "optim.weight_decay": {"log_uniform": [1e-4, 1e-2]},
            "attack.steps": {"randint": [1, 5]}, "model.name": ["wrn-16-1", "wrn-16-4"]}}))
    runs = sweep.expand(spec)
    assert len(runs) == 3 * 3 * 3
    assert sorted({r.overrides["optim.lr"] for r in runs}) == [0.1, 0.2, 0.3]
    assert sorted({r.overrides["method.ikl_at.beta"] for r in runs}) == [1.0, 10.0, 100.0]
    assert runs[0].name.startswith("lr0.1_trades.beta6_ikl_at.beta1_weight_decay")
    assert runs[0].name.endswith("_seed3") and runs[0].config["seed"] == 3
    draws = [r.overrides for r in runs[:3]]
    assert all(1e-4 <= d["optim.weight_decay"] <= 1e-2 and 1 <= d["attack.steps"] <= 5
               for d in draws)
    assert len({d["optim.weight_decay"] for d in draws}) == 3
    assert [r.name for r in sweep.expand(spec)] == [r.name for r in runs]  # the same draws
    assert all(r.config["attack"]["steps"] == r.overrides["attack.steps"] for r in runs)


@pytest.mark.slow
def test_early_stop_counts_validations_and_restores_from_the_records(tmp_path):
    es = EarlyStop("val_robust_acc", patience=2)
    seen = [es.observe({"epoch": e, "val_robust_acc": v})
            for e, v in enumerate([10.0, 12.0, 12.0, None, 11.0, 13.0], 1)]
    assert seen == [False, False, False, False, True, True]
    assert (es.best, es.best_epoch, es.stopped_epoch) == (12.0, 2, 5)  # 13 came after the stop
    assert not EarlyStop("val_robust_acc", 0).observe({"epoch": 1, "val_robust_acc": 1.0})

    # A real run: a learning rate of 1e-12 and frozen BatchNorm statistics keep the validation
    # accuracy flat, so patience 1 stops right after epoch 2. The first call trains one epoch;
    # the resumed run must continue the count from metrics.jsonl (else epoch 2 would be a "new
    # best" and it would train to epoch 3).
    # 200 training images, the 1,037 held out validated clean (PGD-0): the cheapest epochs.
    out = tmp_path / "run"
    args = [*(f"{k}={v}" for k, v in CHEAP.items()), "optim.lr=1e-12", "model.bn_momentum=0.0",
            "train.early_stop.patience=1", f"out_dir={out}", "eval.final_pgd=false",
            "data.val_size=1037", "eval.pgd_steps=0"]
    fit(load_config(DIGITS, args))
    result = fit(load_config(DIGITS, [*args, "optim.epochs=3"]), resume=True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines[1]["val_robust_acc"] == lines[0]["val_robust_acc"]
    assert [r["early_stop"]["bad"] for r in lines] == [0, 1]
    final = json.loads((out / "final.json").read_text())
    assert final == json.loads(json.dumps(result))
    assert final["early_stop"]["stopped_epoch"] == 2 and final["last"]["epoch"] == 2
    assert load(out / "best.pt")["epoch"] == 1  # best.pt chosen as always
