"""Training on a real one-node Slurm (tests/slurm_cluster.py: Debian's slurm-wlm and munge,
installed when missing and the tests run as root): sbatch sh/slurm_train.sh trains to the end on
a CPU node; stopped by each signal Slurm sends (to the job steps, to the whole job, ahead of a
real time limit) it saves, requeues itself and resumes to the weights of the uninterrupted run; a
signal during the final test leaves a finished run; `at.sweep --slurm` job arrays run end to end,
and preempting one task leaves the other alone. Bad input is one line and exit status 1."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from fake_cifar import write_fake_cifar
from slurm_cluster import Cluster, unavailable
from test_preemption import _same

from at.checkpoint import load
from at.config import REPO_ROOT
from at.sweep import main as sweep_main
from eval import summary

pytestmark = pytest.mark.slow

# The CIFAR-10 IKL-AT recipe users submit (its epoch average included), on a wrn-16-1 without AWP,
# through the real CIFAR loader on a fake CIFAR-10 (tests/fake_cifar.py): 400 training images in
# 5 steps an epoch, 50 validation images (the validation of the last epoch costs little), 360
# test images. The final test (PGD-3 on the test set of the last weights, which are also the
# best, and of their epoch average) is long enough to be signalled in. Slurm sends a time-limit
# signal on a periodic pass, up to 30 s after it is due: that run is long enough (about a minute)
# for it to land inside training, and is compared with an uninterrupted run of its own length.
CONFIG = REPO_ROOT / "configs" / "cifar10" / "ikl_at.yaml"
EPOCHS, LONG = 4, 20
N_TRAIN, N_VAL, N_TEST = 450, 50, 360
TRAIN = ["device=cpu", "model.name=wrn-16-1", "model.bn_groups=1", "awp.enabled=false",
         "attack.schedule=fixed", "attack.steps=1", "attack.step_size=8/255",
         "data.download=false", f"data.val_size={N_VAL}", "optim.batch_size=80",
         "eval.every=100", "eval.n_test=50", "eval.pgd_steps=3", "eval.final_pgd=true",
         "log.plot=false"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
TIMEOUT = 800  # seconds one wait may take (queueing included), under sh/test.sh's 900 per test
TIMING = ("images_per_s",)  # and every "..._seconds"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable()
    if reason:
        if os.environ.get("AT_REQUIRE_SLURM") == "1":  # CI: the Slurm tests must run
            pytest.fail(f"AT_REQUIRE_SLURM=1 but no local Slurm: {reason}")
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    write_fake_cifar(str(data_root(cluster)), n_train=N_TRAIN, n_test=N_TEST)
    yield cluster
    cluster.stop()


def data_root(cluster: Cluster) -> Path:
    return cluster.root / "data"


def train_args(cluster: Cluster) -> list[str]:
    """TRAIN, with the cluster's fake CIFAR-10."""
    return [*TRAIN, f"data.root={data_root(cluster)}"]


def job_env(cluster: Cluster) -> dict:
    """What sbatch passes on to the job: this interpreter's environment (sh/venv.sh uses an
    activated one as it is), one thread, no GPU."""
    return {**cluster.env, "VIRTUAL_ENV": sys.prefix,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def slurm_cmd(cluster: Cluster, *args: str, check: bool = True, cwd: Path | None = None) -> str:
    proc = subprocess.run(args, env=job_env(cluster), capture_output=True, text=True, timeout=60,
                          cwd=cwd)
    assert proc.returncode == 0 or not check, f"{' '.join(args)}: {proc.stderr}"
    return proc.stdout


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


class Job:
    """One submitted job (or array task), with its output file."""

    def __init__(self, cluster: Cluster, ref: str, log: Path):
        self.cluster, self.ref, self.log = cluster, ref, log

    @classmethod
    def submit(cls, cluster: Cluster, log: Path, *args: str, cwd: Path = REPO_ROOT) -> "Job":
        proc = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", f"--output={log}",
                               *args], cwd=cwd, env=job_env(cluster), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return cls(cluster, proc.stdout.strip().split(";")[0], log)

    def fields(self) -> dict:
        out = slurm_cmd(self.cluster, "scontrol", "-o", "show", "job", self.ref, check=False)
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def wait_until(self, ready, what: str, timeout: float = TIMEOUT, every: float = 0.3
                   ) -> None:
        """Polls `ready` every `every` seconds; fails when the job ends first or at `timeout`.
        The job's state is asked every few seconds only: each scontrol is a process and a call
        to slurmctld, and the scenarios poll side by side on the 2 cores that run the jobs."""
        start = time.monotonic()
        asked = -math.inf
        while not ready():
            now = time.monotonic()
            if now - asked >= 3 or now - start > timeout:
                asked, state = now, self.fields().get("JobState")
                if now - start > timeout or (state in FINAL_STATES and what != "the end"):
                    raise AssertionError(f"job {self.ref}: no {what} after {now - start:.0f} s "
                                         f"(state {state}); its output ({self.log}):\n"
                                         f"{read(self.log)}")
            time.sleep(every)

    def finish(self) -> dict:
        """Waits for the job's end; its scontrol fields and output."""
        self.wait_until(lambda: self.fields().get("JobState") in FINAL_STATES, "the end",
                        every=1.0)
        return {**self.fields(), "log": read(self.log)}

    def signal(self, *options: str) -> None:
        slurm_cmd(self.cluster, "scancel", "--signal=TERM", *options, self.ref)


def epochs_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def train_job(cluster: Cluster, tmp: Path, name: str, *sbatch: str,
              epochs: int = EPOCHS) -> tuple[Job, Path]:
    """A job of sh/slurm_train.sh; the long runs (epochs != EPOCHS) skip the final PGD test,
    which only the final-test scenario needs."""
    out = tmp / name
    final = [] if epochs == EPOCHS else ["eval.final_pgd=false"]
    job = Job.submit(cluster, tmp / f"{name}.out", f"--job-name={name}", *sbatch,
                     "sh/slurm_train.sh", str(CONFIG), *train_args(cluster), *final,
                     f"optim.epochs={epochs}",
                     f"out_dir={out}")
    return job, out


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items()
             if k not in TIMING and not k.endswith("_seconds")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path, log: str) -> None:
    """Bit-identical to the uninterrupted run: weights, class prior, optimizer state, metrics
    and final test accuracies."""
    a, b = load(reference / "last.pt"), load(run / "last.pt")
    assert _same(a["model"], b["model"]), f"weights differ from the uninterrupted run\n{log}"
    assert _same(a["method"], b["method"]), "class prior differs"
    assert _same(a["optimizer"]["state"][0], b["optimizer"]["state"][0]), "optimizer differs"
    got, want = records(run), records(reference)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want], log
    for key in want[-1]:  # sums carried across the stop: equal up to their summation order
        assert [r.get(key) for r in got] == pytest.approx([r.get(key) for r in want]), key
    assert json.loads((run / "final.json").read_text()) == \
        json.loads((reference / "final.json").read_text())


def assert_one_line(log: str, *needles: str) -> None:
    lines = log.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in log, log
    assert all(n in lines[0] for n in needles), log


# ---- bad input (first, on an empty node) ------------------------------------------------------
def test_bad_input_is_one_line_exit_1_and_nothing_trained_is_lost(slurm, tmp_path, monkeypatch,
                                                                  capsys):
    # slurm_train.sh submitted from outside the repository root.
    job = Job.submit(slurm, tmp_path / "outside.out", str(REPO_ROOT / "sh" / "slurm_train.sh"),
                     str(CONFIG), f"out_dir={tmp_path / 'outside'}", cwd=tmp_path)
    end = job.finish()
    assert end["JobState"] == "FAILED" and end["ExitCode"] == "1:0", end
    assert_one_line(end["log"], "slurm_train.sh: error:", "not the repository root")
    assert not (tmp_path / "outside").exists()

    # `slurm:` options sbatch refuses: nothing written, not even the sweep root. (at.sweep in
    # this process, with the cluster's sbatch: `sbatch --test-only` judges the options.)
    for key, value in job_env(slurm).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    for options, needle in (({"no-such-option": 1}, "no-such-option"),
                            ({"time": "soon"}, "time"), ({"array": "0-9"}, "set by the sweep"),
                            ({"cpus-per-task": 1000}, "node configuration")):
        spec = write_spec(slurm, tmp_path / "bad.yaml", tmp_path / "bad_root", slurm=options)
        code, err = sweep_main([str(spec), "--slurm"]), capsys.readouterr().err
        assert code == 1, err
        assert_one_line(err, "at.sweep: error:", needle)
        assert not (tmp_path / "bad_root").exists()

    # A sweep root the compute node does not see (moved away after the script was written;
    # the output file is elsewhere, as it has to be for anyone to read the error).
    root = tmp_path / "root"
    spec = write_spec(slurm, tmp_path / "s.yaml", root,
                      slurm={"output": f"{tmp_path}/unseen-%a.out"})
    assert sweep_main([str(spec), "--slurm"]) == 0, capsys.readouterr().err
    shutil.copy(root / "sweep.sbatch", tmp_path / "sweep.sbatch")
    root.rename(tmp_path / "elsewhere")
    job = Job(slurm, slurm_cmd(slurm, "sbatch", "--parsable", "--array=0",
                               str(tmp_path / "sweep.sbatch")).strip() + "_0",
              tmp_path / "unseen-0.out")
    end = job.finish()
    assert end["JobState"] == "FAILED" and end["ExitCode"] == "1:0", end
    assert_one_line(end["log"], "slurm: error:", f"sweep root {root} does not exist on node")
    assert not root.exists() and not list((tmp_path / "elsewhere").glob("*/config.yaml"))

    # A requeued job whose out_dir is not there: the first start wrote it where this node does
    # not see it; a fresh start would lose that run.
    proc = subprocess.run(["bash", "sh/slurm_train.sh", str(CONFIG),
                           f"out_dir={tmp_path / 'gone'}"], cwd=REPO_ROOT,
                          env={**job_env(slurm), "SLURM_RESTART_COUNT": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert_one_line(proc.stderr, "slurm: error:", "does not exist on node", "restart 1")
    assert not (tmp_path / "gone").exists()


def write_spec(cluster: Cluster, path: Path, root: Path, slurm: dict | None = None,
               **fields) -> Path:
    """Two points that train the same weights (they differ in the number of test images shown
    per epoch), 4 epochs, one CPU per task."""
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in train_args(cluster))
                 if k != "eval.n_test"}
    overrides["optim.epochs"] = EPOCHS
    spec = {"base": str(CONFIG), "overrides": overrides, "grid": {"eval.n_test": [50, 60]},
            "seeds": [0], "out_root": str(root), "slurm": {"cpus-per-task": 1, **(slurm or {})},
            **fields}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---- the scenarios, run side by side -----------------------------------------------------------
def straight(cluster, tmp, name: str = "straight", epochs: int = EPOCHS) -> dict:
    job, out = train_job(cluster, tmp, name, epochs=epochs)
    return {**job.finish(), "out": out}


def preempted(cluster, tmp, name: str, *scancel: str) -> dict:
    """scancel --signal=TERM [--full] once the first epoch is done."""
    job, out = train_job(cluster, tmp, name)
    job.wait_until(lambda: epochs_done(out) >= 1, "first epoch")
    job.signal(*scancel)
    return {**job.finish(), "out": out}


def time_limit(cluster, tmp) -> dict:
    """A one-minute limit, SIGTERM to the batch shell 58 s ahead of it; the requeued job gets
    the time it needs."""
    job, out = train_job(cluster, tmp, "time_limit", "--time=1", "--signal=B:TERM@58",
                         epochs=LONG)
    job.wait_until(lambda: int(job.fields().get("Restarts", 0)) >= 1, "requeue", every=1.0)
    slurm_cmd(cluster, "scontrol", "update", f"JobId={job.ref}", "TimeLimit=30")
    return {**job.finish(), "out": out}


def final_test(cluster, tmp) -> dict:
    """SIGTERM to the whole job while it tests its final weights."""
    job, out = train_job(cluster, tmp, "final_test")
    last = f"epoch {EPOCHS:3d}/{EPOCHS}"
    job.wait_until(lambda: last in read(job.log), "last epoch")
    signalled = time.time()
    job.signal("--full")
    end = job.finish()
    return {**end, "out": out, "signalled": signalled}


def killed_then_cancelled(cluster, tmp) -> dict:
    """The same sbatch line three times: its training SIGKILLed in the first epoch (nothing saved
    but config.yaml: a node crash, the OOM killer), then cancelled by `scancel` after the first
    epoch, then to the end."""
    job, out = train_job(cluster, tmp, "killed")
    job.wait_until(lambda: (out / "config.yaml").exists(), "config.yaml")
    for pid in Path("/proc").iterdir():  # this job's at.train process (started by this test)
        try:
            cmd = (pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"at.train" in cmd and f"out_dir={out}".encode() in cmd:
            os.kill(int(pid.name), signal.SIGKILL)
    killed = job.finish()
    after_kill = sorted(p.name for p in out.iterdir())
    job, out = train_job(cluster, tmp, "killed")
    job.wait_until(lambda: epochs_done(out) >= 1, "first epoch")
    slurm_cmd(cluster, "scancel", job.ref)
    cancelled = job.finish()
    job, out = train_job(cluster, tmp, "killed")
    return {**job.finish(), "out": out, "killed": killed, "after_kill": after_kill,
            "cancelled": cancelled}


def swept(cluster, tmp) -> dict:
    """A 2-point sweep (write_spec) with an evaluation; task 0 is preempted in its first
    epoch, and task 1, trained without a stop, is its reference."""
    root = tmp / "sweep"
    spec = write_spec(cluster, tmp / "sweep.yaml", root, eval=[
        {"pgd": ["--steps", "1", "--n-ex", "20", "--device", "cpu"]}])
    proc = subprocess.run([sys.executable, "-m", "at.sweep", str(spec), "--slurm"],
                          cwd=REPO_ROOT, env=job_env(cluster), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # Submitted from elsewhere than the repository: the script's paths are absolute.
    array = slurm_cmd(cluster, "sbatch", "--parsable", str(root / "sweep.sbatch"),
                      cwd=tmp).strip()
    names = json.loads((root / "sweep.json").read_text())["runs"]
    tasks = [Job(cluster, f"{array}_{i}", root / f"slurm-{array}_{i}.out") for i in (0, 1)]
    tasks[0].wait_until(lambda: epochs_done(root / names[0]) >= 1, "first epoch")
    tasks[0].signal()  # its own job id is the array's: requeueing by it would requeue both
    ends = [t.finish() for t in tasks]
    return {"root": root, "names": names, "ends": ends, "array": array}


# The long ones first: the queue is first come, first served.
SCENARIOS = {"straight_long": lambda c, t: straight(c, t, "straight_long", LONG),
             "time_limit": time_limit, "straight": straight,
             "steps": lambda c, t: preempted(c, t, "steps"),
             "whole_job": lambda c, t: preempted(c, t, "whole_job", "--full"),
             "final_test": final_test, "killed": killed_then_cancelled, "sweep": swept}


@pytest.fixture(scope="module")
def scenarios(slurm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs")
    pool = ThreadPoolExecutor(len(SCENARIOS), thread_name_prefix="slurm")
    futures = {}
    for name, run in SCENARIOS.items():
        futures[name] = pool.submit(run, slurm, tmp)
        time.sleep(0.5)
    started = time.monotonic()
    yield futures
    pool.shutdown(wait=True)
    print(f"\nSlurm scenarios: {time.monotonic() - started:.0f} s", file=sys.stderr)


def test_a_cpu_node_trains_to_the_end(scenarios):
    end = scenarios["straight"].result()
    assert end["JobState"] == "COMPLETED" and end["Restarts"] == "0", end["log"]
    assert "1 node(s) x 1 process(es)" in end["log"], end["log"]
    assert len(records(end["out"])) == EPOCHS and (end["out"] / "final.json").is_file()
    assert not (end["out"] / "preempted.json").exists()


@pytest.mark.parametrize("name", ["steps", "whole_job", "time_limit"])
def test_a_signal_saves_requeues_and_resumes_to_the_uninterrupted_run(scenarios, name):
    end = scenarios[name].result()
    reference = scenarios["straight_long" if name == "time_limit" else "straight"].result()
    log = end["log"]
    assert end["JobState"] == "COMPLETED" and int(end["Restarts"]) >= 1, log
    assert "at.train: stopped by a signal; saved" in log and "requeueing job" in log, log
    assert "(resuming)" in log, log
    assert_same_run(end["out"], reference["out"], log)


def test_a_signal_during_the_final_test_leaves_a_finished_run(scenarios):
    end, reference = scenarios["final_test"].result(), scenarios["straight"].result()
    log = end["log"]
    assert end["JobState"] == "COMPLETED" and end["Restarts"] == "0", log
    assert "slurm: SIGTERM at" in log and "requeueing" not in log, log
    assert (end["out"] / "final.json").stat().st_mtime > end["signalled"], log
    assert_same_run(end["out"], reference["out"], log)


def test_a_killed_run_and_a_cancelled_one_continue_when_submitted_again(scenarios):
    end, reference = scenarios["killed"].result(), scenarios["straight"].result()
    log = end["log"]
    killed, cancelled = end["killed"], end["cancelled"]
    # Killed before its first checkpoint: failed, not requeued; submitted again, it starts over.
    assert killed["JobState"] == "FAILED" and killed["Restarts"] == "0", log
    assert "last.pt" not in end["after_kill"] and "config.yaml" in end["after_kill"], log
    assert "has no last.pt" in log and "starting from epoch 1" in log, log
    # Cancelled: it saves, and stays cancelled; submitted again, it resumes.
    assert cancelled["JobState"] == "CANCELLED" and cancelled["Restarts"] == "0", log
    assert "the job is ending (cancelled, or at its time limit), so it is not" in log, log
    assert "requeueing" not in log, log
    assert end["JobState"] == "COMPLETED" and log.count("(resuming)") == 2, log
    assert_same_run(end["out"], reference["out"], log)


def test_a_sweep_array_trains_evaluates_and_requeues_only_the_preempted_task(scenarios, capsys):
    result = scenarios["sweep"].result()
    root, names, (first, second) = result["root"], result["names"], result["ends"]
    assert first["JobState"] == second["JobState"] == "COMPLETED", first["log"] + second["log"]
    assert int(first["Restarts"]) >= 1 and "requeueing job " + result["array"] + "_0" in \
        first["log"], first["log"]
    assert second["Restarts"] == "0" and "SIGTERM" not in second["log"], second["log"]
    for name in names:  # evaluated once each
        assert len(json.loads((root / name / "sweep_evals.json").read_text())) == 1
        assert len(list((root / name / "eval").glob("pgd1_*_best.json"))) == 1
    a, b = load(root / names[0] / "last.pt"), load(root / names[1] / "last.pt")
    assert _same(a["model"], b["model"]) and _same(a["method"], b["method"])  # resumed exactly
    capsys.readouterr()
    assert summary.main([str(root), "--format", "json"]) == 0
    runs = [Path(r).name for g in json.loads(capsys.readouterr().out)["groups"]
            for r in g["runs"]]
    assert sorted(runs) == names
