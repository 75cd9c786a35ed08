"""The sections of the device check (bench/device_check.py runs each in its own process).

    python -m bench.device_sections SECTION --device cuda|cpu --size full|tiny --json FILE
                                    [--work DIR] [--results DIR] [--slug NAME]

Each section returns a dict with "status" (ok | failed | skipped), "figures" (one line for the
summary table) and its measurements; it is written to --json. What each measures and why:
docs/device_check.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Problem sizes: "full" is the check on a lent GPU, "tiny" keeps the CPU form (a test) short.
SIZES = {
    "full": {"model": "wrn-34-10", "batch": 128, "attack_steps": 10, "steps": 3, "repeats": 2,
             "train_images": 1280, "val_images": 256, "test_images": 256,
             "aa_images": 500, "aa_iters": 3, "aa_queries": 15, "peak_size": 8192,
             "gen_images": 1_000_000, "gen_train_images": 1536},
    "tiny": {"model": "wrn-16-1", "batch": 8, "attack_steps": 1, "steps": 1, "repeats": 1,
             "train_images": 64, "val_images": 32, "test_images": 32,
             "aa_images": 8, "aa_iters": 1, "aa_queries": 2, "peak_size": 512,
             "gen_images": 2000, "gen_train_images": 96},
}
# AutoAttack standard (Linf): per stage, what the full schedule runs for a point that stays
# robust: (iterations or queries, target classes). Set in pyautoattack's _set_version.
AA_SCHEDULE = {"apgd-ce": (100, 1), "apgd-t": (100, 9), "fab-t": (100, 9), "square": (5000, 1)}
# Share of the 10,000 test images that enters each stage for a robust CIFAR-100 WRN-34-10: the
# reported IKL-AT figures (configs/cifar100/ikl_at.yaml: clean 66.51 %, AutoAttack 31.43 %); after
# APGD-CE taken a little above the final robust accuracy (APGD-T usually removes 1-2 points more).
AA_PROFILE = {"apgd-ce": 0.6651, "apgd-t": 0.33, "fab-t": 0.3143, "square": 0.3143}


class SectionError(RuntimeError):
    """The section could not measure what it should; the message is one line."""


def _run(cmd: list[str], timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:] if text else ""


# ---------------------------------------------------------------- (a) environment
def env(args: argparse.Namespace) -> dict:
    import torch

    smi = shutil.which("nvidia-smi")
    smi_out = _run([smi, "--query-gpu=name,driver_version,memory.total,memory.used,"
                    "temperature.gpu,power.limit,clocks.max.sm,mig.mode.current",
                    "--format=csv"]).stdout.strip() if smi else None
    smi_full = _run([smi]).stdout if smi else None
    cuda = torch.cuda.is_available()
    r = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if cuda else None,
         "python": platform.python_version(), "cpu_count": os.cpu_count(),
         "cuda_available": cuda, "nvidia_smi": smi_out, "nvidia_smi_full": smi_full,
         "disk_free_gb": round(shutil.disk_usage(ROOT).free / 1e9, 1),
         # PyTorch's own defaults, which training uses (the config does not set TF32).
         "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
         "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        r.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gb=round(
            p.total_memory / 2 ** 30, 1), multiprocessors=p.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
            # A bf16 tensor-core GPU: Ampere (8.0) or later.
            bf16_gpu=torch.cuda.is_bf16_supported() and p.major >= 8)
        figures = (f"{p.name} (sm {p.major}.{p.minor}, {r['gpu_memory_gb']} GiB), torch "
                   f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {r['cudnn']}, bf16 GPU "
                   f"{'yes' if r['bf16_gpu'] else 'no'}")
    else:
        r.update(gpu=None, bf16_gpu=False)
        figures = (f"no CUDA device (nvidia-smi {'present' if smi else 'absent'}), torch "
                   f"{torch.__version__}, {os.cpu_count()} CPUs")
    wanted_cuda = args.device.startswith("cuda")
    r["status"] = "failed" if wanted_cuda and not cuda else "ok"
    r["figures"] = figures
    return r


# ---------------------------------------------------------------- (b) CUDA-only tests
def cuda_test_files() -> list[str]:
    """Test files holding tests marked `cuda` (pytest.ini); collecting only them is quick."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.cuda" in p.read_text())


def cuda_tests(args: argparse.Namespace) -> dict:
    files = cuda_test_files()
    if not files:
        raise SectionError("no test is marked `cuda` under tests/")
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        proc = _run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                     f"--junitxml={xml}", "-o", "junit_family=xunit2", *files])
        if not xml.exists():
            raise SectionError(f"pytest wrote no report (exit {proc.returncode}): "
                               f"{_tail(proc.stdout + proc.stderr, 300)}")
        cases = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")),
                           "passed")
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}",
                          "outcome": outcome, "seconds": float(case.get("time", 0))})
    count = {k: sum(c["outcome"] == k for c in cases)
             for k in ("passed", "failure", "error", "skipped")}
    bad = [c["test"] for c in cases if c["outcome"] in ("failure", "error")]
    if bad or proc.returncode not in (0, 5) or not cases:
        status = "failed"
    else:
        status = "ok" if count["passed"] else "skipped"
    figures = (f"{count['passed']} passed, {count['failure'] + count['error']} failed, "
               f"{count['skipped']} skipped of {len(cases)} in {len(files)} files")
    if bad:
        figures += "; failed: " + ", ".join(b.rsplit("::", 1)[-1] for b in bad)
    return {"status": status, "figures": figures, "files": files, "counts": count,
            "tests": cases, "pytest_tail": _tail(proc.stdout, 3000)}


# ---------------------------------------------------------------- (c) training-step throughput
def _at_step(args: argparse.Namespace, extra: list[str]) -> dict:
    s = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "at_step.json"
        cmd = [sys.executable, "-m", "bench.at_step", "--model", s["model"], "--batch",
               str(s["batch"]), "--attack-steps", str(s["attack_steps"]), "--awp",
               "--method", "ikl_at", "--steps", str(s["steps"]), "--repeats", str(s["repeats"]),
               "--device", args.device, "--peak-size", str(s["peak_size"]), "--json", str(out),
               *extra]
        proc = _run(cmd)
        if proc.returncode or not out.exists():
            raise SectionError(f"bench.at_step failed (exit {proc.returncode}): "
                               f"{_tail(proc.stderr, 400).strip().splitlines()[-1:]}")
        return json.loads(out.read_text())


def _tflops(result: dict, images_per_s: float) -> float | None:
    units = result.get("forward_units_per_image")
    return None if units is None else \
        images_per_s * units * result["forward_gflop_per_image"] / 1e3


BF16 = "speed.attack_precision=bfloat16,speed.update_precision=bfloat16"


def step_rows(result: dict, baseline_ips: float | None) -> list[dict]:
    """One row per configuration of a bench.at_step result: images/s, ratio to the baseline,
    achieved TFLOP/s and its share of the measured bf16 (GPU) / float32 (CPU) matmul peak."""
    peak = result["matmul_peak"]["tflops"]
    s = result["setup"]
    name = "compile" + ("" if s.get("speed.compile_mode", "default") == "default"
                        else f" {s['speed.compile_mode']}") if s["speed.compile"] else "fp32"
    entries = [(name, result["ours"])]
    entries += [("bf16 attack+update" if v == BF16 else v, e)
                for v, e in result.get("variant", {}).items()]
    if "baseline" in result:
        entries.append(("baseline (reference-style)", result["baseline"]))
    if "floor" in result:
        entries.append(("floor (" + name + ")", result["floor"]))
    rows = []
    for label, e in entries:
        tflops = _tflops(result, e["images_per_s"])
        rows.append({"config": label, "images_per_s": e["images_per_s"],
                     "seconds_per_step": e["seconds_per_step"],
                     "vs_baseline": float(f"{e['images_per_s'] / baseline_ips:.4g}")
                     if baseline_ips else None,
                     "tflops": float(f"{tflops:.4g}") if tflops is not None else None,
                     "fraction_of_peak": float(f"{tflops / peak:.4g}") if tflops else None})
    return rows


def _figures(rows: list[dict]) -> str:
    return "; ".join(f"{r['config']} {r['images_per_s']:.4g} img/s" + (
        f" ({r['vs_baseline']:.2f}x)" if r["vs_baseline"] else "") + (
        f" {r['tflops']:.3g} TFLOP/s = {r['fraction_of_peak']:.1%} of peak" if r["tflops"]
        else "")
        for r in rows if not r["config"].startswith(("baseline", "floor")))


def at_step(args: argparse.Namespace) -> dict:
    """Baseline vs ours fp32 (TF32 as PyTorch defaults it) vs ours bf16 attack + update, in
    interleaved rounds of one process."""
    import torch
    r = _at_step(args, ["--skip", "attack,data", "--variant", BF16])
    baseline = r["baseline"]["images_per_s"]
    rows = step_rows(r, baseline)
    peak = r["matmul_peak"]
    return {"status": "ok", "figures": _figures(rows) + f"; baseline {baseline:.4g} img/s; "
            f"matmul peak {peak['tflops']:.3g} TFLOP/s {peak['dtype']}", "rows": rows,
            "baseline_images_per_s": baseline,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn": torch.backends.cudnn.allow_tf32},
            "at_step": r}


def _compiled(args: argparse.Namespace, mode: str) -> dict:
    if args.device == "cpu" and not args.cpu_compile:
        return {"status": "skipped", "figures": "torch.compile is timed on a GPU only "
                "(--cpu-compile to force it here)"}
    extra = ["--compile", "--skip", "baseline,attack,data"]
    if mode != "default":
        extra.append(f"speed.compile_mode={mode}")
    r = _at_step(args, extra)
    # The baseline of section c's first part, measured seconds earlier in another process.
    first = Path(args.results) / f"{args.slug}_c-at-step.json"
    baseline = json.loads(first.read_text()).get("baseline_images_per_s") \
        if first.exists() else None
    rows = step_rows(r, baseline)
    return {"status": "ok", "figures": _figures(rows), "rows": rows,
            "baseline_images_per_s": baseline, "at_step": r}


def compile_default(args: argparse.Namespace) -> dict:
    return _compiled(args, "default")


def compile_autotune(args: argparse.Namespace) -> dict:
    return _compiled(args, "max-autotune-no-cudagraphs")


# ---------------------------------------------------------------- (d) trainer on the device
def write_cifar100(root: Path, s: dict) -> None:
    """A random CIFAR-100-shaped set in torchvision's exact on-disk format."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_cifar import write_fake_cifar
    write_fake_cifar(str(root), "cifar100", n_train=s["train_images"] + s["val_images"],
                     n_test=s["test_images"])


def _epochs(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def train(args: argparse.Namespace) -> dict:
    """Two epochs of IKL-AT (+ AWP) through `python -m at.train`, then a resumed third epoch."""
    s = SIZES[args.size]
    work = Path(args.work)
    data_root, out = work / "cifar100", work / "run"
    shutil.rmtree(out, ignore_errors=True)
    write_cifar100(data_root, s)
    common = ["-c", "configs/cifar100/ikl_at.yaml", f"out_dir={out}", f"device={args.device}",
              f"data.root={data_root}", "data.download=false", f"data.val_size={s['val_images']}",
              f"model.name={s['model']}", f"optim.batch_size={s['batch']}", "attack.schedule=fixed",
              f"attack.steps={s['attack_steps']}", "awp.warmup=1", "log.plot=false",
              f"eval.pgd_steps={s['attack_steps']}"]
    checks, timings = {}, {}
    start = time.time()
    first = _run([sys.executable, "-m", "at.train", *common, "optim.epochs=2"])
    timings["two_epochs_s"] = round(time.time() - start, 1)
    if first.returncode:
        raise SectionError(f"at.train exited {first.returncode}: "
                           f"{_tail(first.stderr, 300).strip().splitlines()[-1:]}")
    records = _epochs(out / "metrics.jsonl")
    checks["two_epoch_records"] = [r.get("epoch") for r in records] == [1, 2]
    checks["checkpoints_written"] = all((out / f).exists() for f in ("last.pt", "best.pt"))
    checks["final_json"] = (out / "final.json").exists()
    val_keys = sorted(k for k in (records[-1] if records else {}) if k.startswith("val"))
    checks["validation_recorded"] = bool(val_keys) and all(
        isinstance(records[-1][k], (int, float)) for k in val_keys)
    start = time.time()
    resumed = _run([sys.executable, "-m", "at.train", *common, "optim.epochs=3", "--resume"])
    timings["resumed_epoch_s"] = round(time.time() - start, 1)
    if resumed.returncode:
        raise SectionError(f"at.train --resume exited {resumed.returncode}: "
                           f"{_tail(resumed.stderr, 300).strip().splitlines()[-1:]}")
    records = _epochs(out / "metrics.jsonl")
    checks["resume_continues_at_epoch_3"] = [r.get("epoch") for r in records] == [1, 2, 3]
    # The checkpoint loads back for evaluation (on the device the run used).
    from at.target import load_target
    target = load_target(out, "last", device=args.device)
    checks["checkpoint_loads_for_evaluation"] = target.model is not None
    last = records[-1]
    images_per_s = [r.get("images_per_s") for r in records]
    status = "ok" if all(checks.values()) else "failed"
    failed = [k for k, v in checks.items() if not v]
    return {"status": status, "checks": checks, "timings": timings,
            "images_per_s_per_epoch": images_per_s, "last_record": last,
            "validation_keys": val_keys,
            "figures": (f"{s['model']} 2 epochs {timings['two_epochs_s']:.0f}s + resumed epoch "
                        f"{timings['resumed_epoch_s']:.0f}s; train img/s "
                        + "/".join(f"{v:.0f}" for v in images_per_s if v is not None)
                        + ("; checks ok" if not failed else "; FAILED: " + ", ".join(failed)))}


# ---------------------------------------------------------------- (e) AutoAttack stages
def autoattack(args: argparse.Namespace) -> dict:
    import torch

    import models
    from bench.autoattack_stages import stage_costs
    from eval.precision import evaluation_precision

    s = SIZES[args.size]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.build_model(s["model"], 100, dataset="cifar100").to(device).eval()
    with evaluation_precision(allow_tf32=False):
        costs = stage_costs(model, s["aa_images"], device, iterations=s["aa_iters"],
                            queries=s["aa_queries"])
    per_image = {st["attack"]: st["full_schedule_seconds_per_image"] for st in costs["stages"]}
    n = 10_000
    worst = sum(per_image.values()) * n
    profile = {k: per_image[k] * n * AA_PROFILE[k] for k in per_image}
    expected = sum(profile.values())
    extrapolation = (
        f"per stage: seconds on {costs['n']} images at a tiny eps (every point stays robust and "
        f"runs every iteration), one target class, k and 2k iterations (queries); the difference "
        f"is the cost of an iteration, extended linearly to the standard schedule "
        f"({', '.join(f'{k} {v[0]}x{v[1]}' for k, v in AA_SCHEDULE.items())} iterations (queries) "
        f"x target classes); 10,000 images: the sum over stages of seconds per image x "
        f"images entering the stage, for a robust CIFAR-100 WRN-34-10 "
        f"({', '.join(f'{k} {v:.1%}' for k, v in AA_PROFILE.items())} of the images; points "
        f"broken inside a stage cost less, so an upper bound for that profile), and the worst "
        f"case (all 10,000 through every stage)")
    return {"status": "ok", "tf32": False, **costs, "extrapolation": extrapolation,
            "profile": AA_PROFILE, "seconds_10k_profile": round(expected, 1),
            "seconds_10k_worst": round(worst, 1), "minutes_10k_profile": round(expected / 60, 1),
            "seconds_10k_by_stage": {k: round(v, 1) for k, v in profile.items()},
            "figures": f"{s['model']} fp32 (TF32 off): " + ", ".join(
                f"{k} {v * 1e3:.1f} ms/img" for k, v in per_image.items())
            + f"; 10k images ~ {expected / 60:.1f} min (robust profile), "
            f"{worst / 60:.1f} min worst case"}


# ---------------------------------------------------------------- (f) generated-data loader
def generated(args: argparse.Namespace) -> dict:
    s = SIZES[args.size]
    work = Path(args.work)
    data_root = work / "cifar100_gen"
    write_cifar100(data_root, {**s, "train_images": s["gen_train_images"]})
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        out = Path(tmp) / "generated.json"
        cmd = [sys.executable, "-m", "bench.generated_data", "--images", str(s["gen_images"]),
               "--fit-disk", "0.25", "--dir", str(Path(tmp) / "set"), "--dataset", "cifar100",
               "--data-root", str(data_root), "--model", s["model"], "--method", "ikl_at",
               "--steps", str(s["attack_steps"]), "--batch", str(s["batch"]), "--epochs", "2",
               "--device", args.device, "--override", f"data.val_size={s['val_images']}",
               "--override", "eval.final_pgd=false",  # the loader is timed, not the model
               "--json", str(out)]
        proc = _run(cmd)
        if proc.returncode or not out.exists():
            raise SectionError(f"bench.generated_data failed (exit {proc.returncode}): "
                               f"{_tail(proc.stderr, 400).strip().splitlines()[-1:]}")
        r = json.loads(out.read_text())
    ratio = r["throughput_ratio"]
    r.update(status="ok", figures=(
        f"{r['images']} generated images ({r['images'] * 3072 / 1e9:.2g} GB, written in "
        f"{r['write_seconds']:.0f}s); real {r['real_images_per_s']:.1f} img/s, mixed "
        f"{r['mixed_images_per_s']:.1f} img/s (x{ratio:.3f}); peak RSS "
        f"{r['peak_rss_delta_mb']:+.0f} MB"))
    return r


SECTIONS = {"a-env": env, "b-cuda-tests": cuda_tests, "c-at-step": at_step,
            "c-compile": compile_default, "c-compile-autotune": compile_autotune,
            "d-train": train, "e-autoattack": autoattack, "f-generated-data": generated}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_sections", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=list(SECTIONS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--json", required=True)
    p.add_argument("--work", default=tempfile.gettempdir(), help="scratch directory")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--slug", default="device")
    p.add_argument("--cpu-compile", action="store_true")
    args = p.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    try:
        result = SECTIONS[args.section](args)
        code = 0
    except SectionError as err:
        result = {"status": "failed", "figures": re.sub(r"\s+", " ", str(err))[:300]}
        code = 1
    except Exception as err:  # noqa: BLE001 - a harness reports any failure (CUDA errors too)
        traceback.print_exc()  # into the section's log, kept in its JSON
        result = {"status": "failed",
                  "figures": re.sub(r"\s+", " ", f"{type(err).__name__}: {err}")[:300]}
        code = 1
    Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{args.section}: {result['status']}: {result['figures']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
