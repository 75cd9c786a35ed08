"""The device check (bench/device_check.sh) in its CPU form, its per-section isolation, the figures
it derives, the explicit evaluation precision (TF32) and the speed.compile_mode setting; plus the
NCCL path, which only a GPU runs."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from at.config import load_config
from at.run_dir import RESUMABLE_CHANGES
from bench import device_check, device_sections
from bench.device_check import SECTIONS
from errors import ConfigError
from eval.precision import evaluation_precision, tf32_enabled

ROOT = Path(__file__).resolve().parents[1]
QUICK = [s[0] for s in SECTIONS if s[4]]


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "WANDB_MODE": "disabled", "MPLBACKEND": "Agg", **extra}


def _venv_is_current() -> bool:
    """Whether this interpreter's environment was made by sh/venv.sh for these requirements (then
    the shell script uses it without installing anything)."""
    stamp = Path(sys.prefix) / ".requirements.sha"
    want = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in
                                   ("requirements.txt", "requirements-test.txt"))).hexdigest()
    return stamp.exists() and stamp.read_text().strip() == want and sys.prefix != sys.base_prefix


def _check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    if _venv_is_current():  # the real entry point, with this environment already activated
        cmd = ["bash", "bench/device_check.sh", *args]
        env = {**(env or _env()), "VIRTUAL_ENV": sys.prefix}
    else:
        cmd = [sys.executable, "-m", "bench.device_check", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                          timeout=600)


def _results(out: Path) -> dict[str, dict]:
    return {p.stem.split("_", 1)[1]: json.loads(p.read_text()) for p in out.glob("*.json")}


@pytest.mark.slow
def test_cpu_quick_check_runs_every_quick_section_and_writes_the_table(tmp_path):
    proc = _check("--device", "cpu", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = _results(tmp_path)
    assert sorted(results) == sorted(QUICK)  # --quick: (a)-(c), one file per section
    assert {k: r["status"] for k, r in results.items()} == {
        "a-env": "ok", "b-cuda-tests": "skipped", "c-at-step": "ok", "c-compile": "skipped"}
    env = results["a-env"]
    assert env["cuda_available"] is False and env["torch"] == torch.__version__
    # (b) ran every test marked `cuda`, each skipped here; the sync-free step is among them.
    tests = results["b-cuda-tests"]
    assert tests["counts"]["skipped"] == len(tests["tests"]) >= 7
    assert any("never_synchronise" in t["test"] for t in tests["tests"])
    assert any("nccl" in t["test"] for t in tests["tests"])
    # (c) the three configurations with their throughput, ratio and TFLOP/s.
    rows = {r["config"]: r for r in results["c-at-step"]["rows"]}
    assert {"fp32", "bf16 attack+update", "baseline (reference-style)"} <= set(rows)
    base = results["c-at-step"]["baseline_images_per_s"]
    for row in rows.values():
        assert row["images_per_s"] > 0
        assert row["vs_baseline"] == pytest.approx(row["images_per_s"] / base, rel=1e-3)
    assert 0 < rows["fp32"]["fraction_of_peak"] == pytest.approx(
        rows["fp32"]["tflops"] / results["c-at-step"]["at_step"]["matmul_peak"]["tflops"],
        rel=1e-3)
    setup = results["c-at-step"]["at_step"]["setup"]
    assert (setup["model"], setup["awp"], setup["method"]) == ("wrn-16-1", True, "ikl_at")
    # The summary: printed and written, one row per section after the set-up row.
    summary = next(tmp_path.glob("*_summary.txt")).read_text()
    lines = [line for line in summary.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == QUICK
    assert "| section | status | key figures | time |" in proc.stdout


@pytest.mark.slow
def test_a_hung_or_failing_section_stops_nothing_else(tmp_path):
    # (a) cannot start Python and import torch in 0.5 s: it is killed; the next section still
    # runs. Asking for CUDA where there is none fails (a) instead: the exit status reports it.
    proc = _check("--device", "cpu", "--out", str(tmp_path), "--sections",
                  "a-env,c-compile", "--timeout", "a-env=0.5")
    assert proc.returncode == 1
    results = _results(tmp_path)
    assert results["a-env"]["status"] == "timeout" and results["a-env"]["timeout"] == 0.5
    assert results["c-compile"]["status"] == "skipped"
    out = tmp_path / "failing"
    proc = _check("--device", "cuda", "--out", str(out), "--sections", "a-env")
    assert proc.returncode == 1
    assert _results(out)["a-env"]["status"] == "failed"


def test_a_spent_budget_runs_nothing_more_but_still_writes_the_summary(tmp_path, monkeypatch,
                                                                        capsys):
    # In this process (no section is started): the shell script's start time, 100 s ago.
    monkeypatch.setenv("DEVICE_CHECK_STARTED", str(time.time() - 100))
    assert device_check.main(["--device", "cpu", "--out", str(tmp_path), "--budget", "60",
                              "--sections", "a-env,b-cuda-tests"]) == 1
    assert {r["status"] for r in _results(tmp_path).values()} == {"not run"}
    assert "budget" in next(tmp_path.glob("*_summary.txt")).read_text()


@pytest.mark.parametrize("args, problem", [
    (["--timeout", "b-cuda-tests"], "expected SECTION=SECONDS"),
    (["--timeout", "z=3"], "unknown section 'z'"),
    (["--sections", "a-env,zz"], "--sections: unknown zz"),
])
def test_bad_arguments_are_one_line_errors(args, problem, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's exit: status 2
        device_check.main(["--out", str(tmp_path), *args])
    assert stop.value.code == 2 and problem in capsys.readouterr().err.splitlines()[-1]
    assert not list(tmp_path.iterdir())


def test_step_rows_derive_ratios_and_tflops_from_the_timings():
    result = {
        "matmul_peak": {"tflops": 100.0, "dtype": "bfloat16"},
        "forward_units_per_image": 30, "forward_gflop_per_image": 2.0,
        "setup": {"speed.compile": True, "speed.compile_mode": "max-autotune-no-cudagraphs"},
        "ours": {"images_per_s": 500.0, "seconds_per_step": 0.256},
        "variant": {device_sections.BF16: {"images_per_s": 800.0, "seconds_per_step": 0.16}},
        "baseline": {"images_per_s": 100.0, "seconds_per_step": 1.28},
    }
    rows = {r["config"]: r for r in device_sections.step_rows(result, 125.0)}
    ours = rows["compile max-autotune-no-cudagraphs"]
    # 500 images/s x 30 forward-equivalents x 2 GFLOP = 30 TFLOP/s, 30 % of the 100 peak.
    assert (ours["tflops"], ours["fraction_of_peak"], ours["vs_baseline"]) == (30.0, 0.3, 4.0)
    assert rows["bf16 attack+update"]["tflops"] == 48.0
    assert rows["baseline (reference-style)"]["vs_baseline"] == 0.8


def test_autoattack_stage_costs_keep_every_point_robust_and_scale_to_the_full_schedule():
    from bench.autoattack_stages import stage_costs
    from models import build_model
    torch.manual_seed(0)
    model = build_model("wrn-16-1", 10, dataset="cifar10")
    costs = stage_costs(model, 4, torch.device("cpu"), iterations=1, queries=2)
    assert [s["attack"] for s in costs["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for s in costs["stages"]:
        # Nobody is broken at the tiny radius: every point ran every iteration, as robust ones do.
        assert s["robust_after"] == s["points"] == 4
        assert s["full_schedule_seconds_per_image"] > s["seconds"][0] / 4


def test_evaluation_precision_switches_tf32_off_and_restores_the_caller_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with evaluation_precision(allow_tf32=False):
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32 and not tf32_enabled()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with pytest.raises(KeyError), evaluation_precision(allow_tf32=True):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            raise KeyError("restored on errors too")
        assert not tf32_enabled()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("cli", ["pgd", "autoattack"])
@pytest.mark.parametrize("flag, expected", [([], False), (["--allow-tf32"], True)])
def test_eval_clis_run_under_the_chosen_tf32_setting_and_record_it(
        cli, flag, expected, tmp_path, monkeypatch):
    from eval import autoattack, pgd
    from models import build_model
    torch.manual_seed(0)
    torch.save(build_model("wrn-16-1", 10, dataset="digits").state_dict(), tmp_path / "m.pt")
    module, inner, args = {
        "pgd": (pgd, "correct", ["--steps", "1"]),
        "autoattack": (autoattack, "attack_chunk", ["--attacks", "apgd-ce"])}[cli]
    seen = []
    real = getattr(module, inner)

    def spy(*a, **kw):  # the flags the attack ran under
        seen.append(_flags())
        return real(*a, **kw)

    monkeypatch.setattr(module, inner, spy)
    before = _flags()
    assert module.main([str(tmp_path / "m.pt"), "--arch", "wrn-16-1", "--dataset", "digits",
                        "--device", "cpu", "--n-ex", "8", "--batch-size", "8", *args,
                        *flag]) == 0
    assert seen and set(seen) == {(expected, expected)}
    assert _flags() == before  # restored for the caller
    result = json.loads(next(p for p in tmp_path.rglob("*.json")
                             if p.name.startswith(("pgd1_", "autoattack-"))).read_text())
    assert result["tf32"] is expected


def test_compile_mode_is_checked_and_passed_to_torch_compile(monkeypatch):
    from at import speed
    with pytest.raises(ConfigError, match="speed.compile_mode must be one of default, "):
        load_config(None, ["speed.compile_mode=fastest"])  # checked when the config is loaded
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw["mode"]))
    base = load_config(None, ["speed.compile=true"])["speed"]
    assert base["compile_mode"] == "default"
    for mode in ("default", "max-autotune-no-cudagraphs"):
        speed.prepare_model(torch.nn.Linear(2, 2), {**base, "compile_mode": mode})
    assert modes == [None, "max-autotune-no-cudagraphs"]
    # Like compile itself, the mode may change when a run is resumed (kernels, not the method).
    assert "speed.compile_mode".startswith(RESUMABLE_CHANGES)


NCCL_SCRIPT = """
import torch, torch.distributed as dist
from at import distributed
device = distributed.init("cuda")  # what the trainer calls under torchrun
assert dist.get_backend() == "nccl", dist.get_backend()
# The project's helpers skip collectives in a group of one; call NCCL itself, so that its
# communicator is built and its kernels run on this GPU.
t = torch.arange(3.0, device=device)
dist.all_reduce(t)
dist.broadcast(t, src=0)
dist.barrier()
assert t.tolist() == [0.0, 1.0, 2.0]
assert distributed.broadcast_object({"a": 1}) == {"a": 1}
distributed.shutdown()
print("nccl ok")
"""
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_process_group_on_the_gpu(tmp_path):
    script = tmp_path / "nccl_check.py"
    script.write_text(NCCL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*TORCHRUN, "--nproc_per_node=1", str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "nccl ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_torchrun_training_over_nccl(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    proc = subprocess.run([*TORCHRUN, "--nproc_per_node=2", "-m", "at.train", "-c",
                           "configs/digits/ikl_at.yaml", "device=cuda", f"out_dir={out}",
                           "optim.epochs=1", "log.plot=false", "eval.final_pgd=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
