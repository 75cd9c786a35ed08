"""One prepared check of every CUDA path and GPU speed figure (docs/device_check.md).

    bash bench/device_check.sh [--quick] [--device auto|cuda|cpu] [--out DIR] [--size full|tiny]
                               [--budget SECONDS] [--timeout SECTION=SECONDS ...]
                               [--sections a-env,c-at-step,...] [--cpu-compile]

Runs, in order: (a) the environment, (b) the CUDA-only tests, (c) training-step throughput
(baseline vs ours fp32 / bf16 / compiled / compiled with max-autotune-no-cudagraphs), (d) two
epochs of IKL-AT through the trainer with checkpoint, resume and validation checks, (e) AutoAttack
stage timings extrapolated to 10,000 images, (f) the generated-data loader against real images
only; --quick runs (a)-(c) without max-autotune. Each section runs in its own process group under
its own timeout (and within what is left of --budget), so a failure or a hang stops nothing else;
each writes <out>/<device>_<section>.json, and the summary table is printed at the end and written
to <out>/<device>_summary.txt (a Markdown table). On a CPU the sizes are tiny (the form the
test suite runs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (section, what it is, timeout on a GPU in seconds, timeout at the tiny CPU size, in --quick).
# The GPU timeouts sum to 6 minutes, which with up to 2 minutes of venv install keeps the whole
# check within 8 minutes on an H100-class card; the --quick ones to 3 minutes. Compiling takes the
# largest share; max-autotune, the longest to compile and the least essential, is left out of
# --quick.
SECTIONS = [
    ("a-env", "environment", 10, 60, True),
    ("b-cuda-tests", "CUDA-only tests", 40, 120, True),
    ("c-at-step", "step: baseline / fp32 / bf16", 45, 240, True),
    ("c-compile", "step: torch.compile", 85, 600, True),
    ("c-compile-autotune", "step: compile max-autotune-no-cudagraphs", 60, 600, False),
    ("d-train", "2-epoch IKL-AT + resume", 45, 300, False),
    ("e-autoattack", "AutoAttack stages -> 10k", 35, 300, False),
    ("f-generated-data", "generated vs real loader", 40, 300, False),
]
# Below this many seconds a section is not started (it could not finish), and reported so.
MIN_SECONDS = 5


def device_slug(device: str) -> str:
    """A file-name form of the device: e.g. nvidia-h100-80gb-hbm3, or cpu-epyc-2core."""
    import torch
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        from bench.at_step import _cpuinfo
        model = next((line.split(":", 1)[1] for line in _cpuinfo().splitlines()
                      if line.startswith("model name")), "")
        words = [w for w in re.findall(r"[a-z0-9]+", model.lower())
                 if w not in ("amd", "intel", "r", "tm", "cpu", "processor", "genuine")]
        name = f"cpu {words[0] if words else ''} {os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash bench/device_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="sections a, b and c only (c without max-autotune)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cuda | cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the JSON files "
                   "and the summary go (default bench/results)")
    p.add_argument("--size", choices=("full", "tiny"), help="problem sizes (default: full on a "
                   "GPU, tiny on a CPU)")
    p.add_argument("--budget", type=float, help="seconds for the whole check, counted from the "
                   "start of bench/device_check.sh (default at full size: 480, --quick 180; 0 = "
                   "unlimited, the default at tiny size)")
    p.add_argument("--timeout", action="append", default=[], metavar="SECTION=SECONDS",
                   help="another timeout for one section (repeatable)")
    p.add_argument("--sections", help="comma-separated subset of: "
                   + ", ".join(s[0] for s in SECTIONS))
    p.add_argument("--work", help="scratch directory (default: a temporary one)")
    p.add_argument("--cpu-compile", action="store_true",
                   help="also time torch.compile on a CPU (minutes)")
    args = p.parse_args(argv)
    names = [s[0] for s in SECTIONS]
    args.timeouts = {}
    for item in args.timeout:
        key, _, value = item.partition("=")
        try:
            args.timeouts[key] = float(value)
        except ValueError:
            p.error(f"--timeout {item}: expected SECTION=SECONDS")
        if key not in names:
            p.error(f"--timeout {item}: unknown section {key!r}; valid: {', '.join(names)}")
    if args.sections:
        args.sections = args.sections.split(",")
        unknown = set(args.sections) - set(names)
        if unknown:
            p.error(f"--sections: unknown {', '.join(sorted(unknown))}; valid: {', '.join(names)}")
    return args


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_section(name: str, args: argparse.Namespace, timeout: float, json_path: Path,
                work: Path, log_path: Path) -> tuple[dict, float]:
    """Run one section in its own process group; (its result, seconds taken)."""
    cmd = [sys.executable, "-m", "bench.device_sections", name, "--device", args.device,
           "--size", args.size, "--json", str(json_path), "--work", str(work / name),
           "--results", str(args.out), "--slug", args.slug]
    if args.cpu_compile:
        cmd.append("--cpu-compile")
    start = time.monotonic()
    with open(log_path, "w") as log:
        # A new session: on timeout the whole group (pytest, the trainer, compile workers) dies.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            return {"status": "timeout", "figures": f"stopped after {timeout:.0f}s"}, \
                time.monotonic() - start
        finally:
            _kill_group(proc)  # stray grandchildren (e.g. DataLoader workers)
    seconds = time.monotonic() - start
    try:
        result = json.loads(json_path.read_text())
    except (OSError, ValueError):
        tail = log_path.read_text()[-300:].strip().splitlines()
        result = {"status": "failed", "figures": f"exit {proc.returncode}, no result: "
                  + (tail[-1] if tail else "no output")}
    return result, seconds


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| section | status | key figures | time |", "|---|---|---|---|"]
    for r in rows:
        figures = str(r["figures"]).replace("|", "/")
        lines.append(f"| {r['section']} | {r['status']} | {figures} | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    started = float(os.environ.get("DEVICE_CHECK_STARTED", time.time()))
    setup_seconds = max(0.0, time.time() - started)
    import torch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"device_check: --device {args.device}, but torch {torch.__version__} sees no CUDA "
              f"device; sections needing it will fail", file=sys.stderr)
        args.slug = "cuda-unavailable"
    else:
        args.slug = device_slug(args.device)
    gpu = args.device.startswith("cuda")
    args.size = args.size or ("full" if gpu else "tiny")
    if args.budget is None:  # the time of a GPU loan; the tiny CPU form has its timeouts only
        args.budget = (180 if args.quick else 480) if args.size == "full" else 0
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in SECTIONS if (s[4] or not args.quick)
              and (not args.sections or s[0] in args.sections)]
    rows = [{"section": "setup (venv, imports)", "status": "ok",
             "figures": f"torch {torch.__version__}, device {args.device}, size {args.size}",
             "seconds": setup_seconds}]
    with tempfile.TemporaryDirectory(prefix="device_check_", dir=args.work) as work:
        work = Path(work)
        for name, what, gpu_timeout, cpu_timeout, _ in chosen:
            timeout = args.timeouts.get(name, gpu_timeout if args.size == "full" else cpu_timeout)
            spent = bool(args.budget) and args.budget - (time.time() - started) < MIN_SECONDS
            if args.budget:
                timeout = min(timeout, args.budget - (time.time() - started))
            json_path = args.out / f"{args.slug}_{name}.json"
            if spent:
                result, seconds = {"status": "not run", "figures": "the --budget was spent"}, 0.0
            else:
                print(f"[{name}] {what} (timeout {timeout:.0f}s) ...", flush=True)
                result, seconds = run_section(name, args, timeout, json_path, work,
                                              work / f"{name}.log")
                log = (work / f"{name}.log").read_text()
                result.setdefault("log_tail", log[-4000:])
            result.update(section=name, description=what, seconds=round(seconds, 1),
                          timeout=round(timeout, 1), device=args.device, size=args.size)
            json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
            print(f"[{name}] {result['status']} in {seconds:.0f}s: {result['figures']}",
                  flush=True)
            rows.append({"section": name, "status": result["status"],
                         "figures": result["figures"], "seconds": seconds})
    total = time.time() - started
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (f"Device check on {args.slug} ({args.device}, {args.size} sizes"
              f"{', quick' if args.quick else ''}), {when}, {total:.0f} s in all")
    text = table(rows, header)
    (args.out / f"{args.slug}_summary.txt").write_text(text)
    print("\n" + text)
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
