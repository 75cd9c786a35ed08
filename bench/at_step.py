"""Throughput of full adversarial-training iterations and of the attack alone: ours, a
reference-style baseline and the essential-pass floor, side by side in one process.

    python -m bench.at_step [--config configs/cifar100/ikl_at.yaml] [--model wrn-16-1]
        [--batch 128] [--attack-steps 10] [--awp] [--attack-precision bfloat16]
        [--update-precision bfloat16] [--no-channels-last] [--compile] [--autoattack 500]
        [--single-step]
        [--json bench/results/NAME.json] [dotted.key=value ...]

* ours: the real trainer (at.trainer.Trainer.train_epoch: loader, augmentation, attack, AWP,
  outer step, statistics) on epochs of --steps iterations, with the config's `speed` settings;
* baseline: bench/reference_step.py, the same method written the way the reference code is
  (natural logits recomputed per attack step, B×C×C wMSE, PIL DataLoader, .item() per step,
  float32 NCHW), with the same model, initial weights, batch, data and attack;
* floor: bench/floor.py, only the forward/backward passes the method needs, with our layout and
  precision.
Also timed: the attack alone (ours / baseline on one fixed batch), the data path alone (our
device-resident loader / the PIL DataLoader) and, with --variant, ours with config changes (e.g.
`--variant speed.channels_last=false` measures what channels_last buys; --single-step adds
SINGLE_STEP_VARIANTS, N-FGSM, FGSM-RS and FGSM + GradAlign beside the configured PGD: their
`ours_vs_variant` ratios are the single-step iteration's time over PGD's). Rounds are interleaved
(every row once per round, a warm-up round first); each figure is the median over --repeats
rounds, each ratio the median of the two rows' per-round ratios. Data: random uint8 images with
the config's number of classes (--data synthetic), or a real dataset by name. --autoattack N
also times each AutoAttack stage (bench/autoattack_stages.py) on N images: a run's test images
with --aa-target, else random images labelled with the model's own predictions.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import data as datasets
import models
from at import speed
from at.config import load_config
from at.schedules import attack_budget
from errors import USER_ERRORS, RunError, report
from eval.common import check_writable, write_result

from .floor import FloorStep, forward_units
from .reference_step import ReferenceStep, loader

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar100" / "ikl_at.yaml"
# --single-step: the inner attacks of docs/reference.md#single-step-attacks and GradAlign (with
# FGSM from x, as in its paper), each timed as a variant of the configured method.
SINGLE_STEP_VARIANTS = ("attack.kind=n_fgsm", "attack.kind=fgsm_rs",
                        "attack.kind=fgsm,method.grad_align=0.2")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                  if line.startswith("model name")), platform.processor() or "cpu")
    return f"{model} ({torch.get_num_threads()} threads)"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_gflop(model_name: str, num_classes: int, dataset: str) -> float:
    """GFLOP of one forward pass of one 32×32 image (convolutions and linear layers)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = models.build_model(model_name, num_classes, dataset=dataset).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    return counter.get_total_flops() / 1e9


def matmul_peak_tflops(device: torch.device, n: int | None = None) -> dict:
    """Measured dense matmul rate of n×n matrices (default 8192 on a GPU, 2048 on a CPU):
    bfloat16 on a GPU (its tensor-core peak), float32 on a CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(6):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        times.append((time.perf_counter() - start) / 4)
    return {"dtype": str(dtype).replace("torch.", ""),
            "tflops": 2 * n ** 3 / min(times[1:]) / 1e12}


def synthetic_splits(n: int, num_classes: int, seed: int = 0) -> datasets.Splits:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n,), generator=g)
    empty = x[:0]
    return datasets.Splits(x, y, empty, y[:0], x[:256], y[:256], num_classes, "synthetic")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.at_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (method, "
                   "attack and loss settings)")
    p.add_argument("--model", default="wrn-16-1")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--method", help="override method.name (standard | pgd_at | trades | ikl_at "
                   "| lbgat; baseline and floor exist for the first four)")
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--awp", action="store_true", help="adversarial weight perturbation on")
    p.add_argument("--attack-precision", choices=list(speed.PRECISIONS), default="float32")
    p.add_argument("--update-precision", choices=list(speed.PRECISIONS), default="float32")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-fused-optimizer", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--steps", type=int, default=4, help="iterations per timed epoch")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--data", default="synthetic", help="synthetic | cifar10 | cifar100 | digits")
    p.add_argument("--data-root", default="data")
    p.add_argument("--workers", type=int, help="baseline DataLoader workers (default: 0 on CPU, "
                   "where workers would take the compute cores; 8 on a GPU)")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also time ours with these config changes in the same rounds (e.g. "
                   "speed.channels_last=false); repeatable")
    p.add_argument("--single-step", action="store_true",
                   help="also time the single-step attacks and GradAlign as variants "
                   "(SINGLE_STEP_VARIANTS)")
    p.add_argument("--skip", default="", help="comma-separated rows not to time: baseline, "
                   "floor, attack, data")
    p.add_argument("--autoattack", type=int, default=0, metavar="N",
                   help="also time each AutoAttack (standard, Linf 8/255) stage on N images")
    p.add_argument("--aa-target", help="run directory (or checkpoint) whose model and test "
                   "images --autoattack times (default: the benchmark's model, random images)")
    p.add_argument("--aa-weights", default="best", help="best | last | avg, with --aa-target")
    p.add_argument("--peak-size", type=int, help="matrix size of the matmul peak measurement "
                   "(default 8192 on a GPU, 2048 on a CPU)")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = p.parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    if args.skip - {"baseline", "floor", "attack", "data"}:
        p.error(f"--skip: unknown rows {', '.join(sorted(args.skip))}; "
                f"valid: baseline, floor, attack, data")
    args.no_baseline = "baseline" in args.skip
    if args.single_step:
        args.variant += [v for v in SINGLE_STEP_VARIANTS if v not in args.variant]
    if min(args.batch, args.steps, args.repeats) < 1 or args.attack_steps < 0:
        p.error("--batch, --steps and --repeats must be >= 1, --attack-steps >= 0")
    return args


def _config(args: argparse.Namespace, out_dir: str, device: str,
            extra: list[str] = ()) -> dict:
    overrides = [
        f"out_dir={out_dir}", f"device={device}", f"model.name={args.model}",
        f"optim.batch_size={args.batch}", "attack.schedule=fixed", "attack.eps_ramp=false",
        f"attack.steps={args.attack_steps}", f"awp.enabled={str(args.awp).lower()}",
        "awp.warmup=1", "log.plot=false", "checkpoint.every_minutes=0", "data.val_size=0",
        f"speed.attack_precision={args.attack_precision}",
        f"speed.update_precision={args.update_precision}",
        f"speed.channels_last={str(not args.no_channels_last).lower()}",
        f"speed.fused_optimizer={str(not args.no_fused_optimizer).lower()}",
        f"speed.compile={str(args.compile).lower()}"]
    if args.method:
        overrides.append(f"method.name={args.method}")
    if args.data != "synthetic":
        overrides += [f"data.name={args.data}", f"data.root={args.data_root}"]
    return load_config(args.config, overrides + args.overrides + list(extra))


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    from at.trainer import Trainer, resolve_device
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args, str(Path(tmp) / "run"), str(device))
        method = cfg["method"]["name"]
        n = args.steps * args.batch
        if args.data == "synthetic":
            num_classes = datasets.NUM_CLASSES.get(cfg["data"]["name"], 10)
            splits = synthetic_splits(n, num_classes, cfg["seed"])
        else:
            splits = datasets.load_splits(args.data, root=args.data_root, val_size=0,
                                          download=False)
            splits.train_x, splits.train_y = splits.train_x[:n], splits.train_y[:n]
            if len(splits.train_y) < n:
                raise RunError(f"--data {args.data} has {len(splits.train_y)} training images, "
                               f"fewer than --steps x --batch = {n}")
            num_classes = splits.num_classes
        trainer = Trainer(cfg, splits=splits)
        model = trainer.model
        x = speed.to_memory_format(datasets.to_float(splits.train_x[:args.batch].to(device)),
                                   cfg["speed"])
        y = splits.train_y[:args.batch].to(device)
        budget = attack_budget(cfg["attack"], 1, cfg["optim"]["epochs"])

        def epoch_of(t: Trainer):
            def run_epoch() -> None:
                t.epoch += 1  # (the schedules are flat: attack, AWP and costs stay the same)
                t.train_epoch()
            return run_epoch

        def ours_attack() -> None:
            with speed.autocast(device, cfg["speed"]["attack_precision"]):
                for _ in range(args.steps):
                    trainer.method.perturb(model, x, y, budget)

        # name -> a callable processing --steps batches; "group/name" rows are sub-measurements.
        timers = {"ours": epoch_of(trainer)}
        for i, change in enumerate(args.variant):
            other = Trainer(_config(args, str(Path(tmp) / f"variant{i}"), str(device),
                                    change.split(",")), splits=splits)
            timers[f"variant/{change}"] = epoch_of(other)
        if not args.no_baseline:
            reference = models.build_model(args.model, num_classes,
                                           dataset=cfg["data"]["name"]).to(device)
            reference.load_state_dict(model.state_dict())
            ref = ReferenceStep(reference, cfg, num_classes, args.awp)
            workers = args.workers if args.workers is not None else \
                (8 if device.type == "cuda" else 0)
            batches = loader(splits.train_x, splits.train_y, args.batch, workers, device,
                             cfg["seed"])
            x_nchw = x.contiguous()

            def baseline() -> None:
                flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
                try:
                    for xb, yb in batches:
                        ref.step(xb, yb)
                finally:
                    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags

            timers["baseline"] = baseline
        if "floor" not in args.skip:
            floor = FloorStep(model, method, args.attack_steps, args.awp, cfg["speed"], device)
            timers["floor"] = lambda: [floor(x) for _ in range(args.steps)]
        if trainer.method.uses_attack and "attack" not in args.skip:
            timers["attack/ours"] = ours_attack
            if not args.no_baseline:
                timers["attack/baseline"] = lambda: [ref.perturb(x_nchw, y)
                                                     for _ in range(args.steps)]
        if "data" not in args.skip:
            timers["data/ours"] = lambda: [b for b in trainer.loader]
        if not args.no_baseline and "data" not in args.skip:
            timers["data/baseline"] = lambda: [(xb.to(device), yb.to(device))
                                               for xb, yb in batches]

        seconds: dict[str, list[float]] = {k: [] for k in timers}
        for round_ in range(args.repeats + 1):  # round 0 warms up (and compiles)
            for name, fn in timers.items():
                took = _timed(fn, device)
                if round_:
                    seconds[name].append(took)
            print(f"round {round_}/{args.repeats}: " + ", ".join(
                f"{k} {v[-1]:.2f}s" for k, v in seconds.items() if v and round_), file=sys.stderr)

        gflop = forward_gflop(args.model, num_classes, cfg["data"]["name"])
        units = forward_units(method, args.attack_steps, args.awp) \
            if method in ("standard", "pgd_at", "trades", "ikl_at") else None
        result = {
            "device": device_name(device), "device_type": device.type,
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16_native": speed.cpu_has_native_bf16() if device.type == "cpu" else None,
            "threads": torch.get_num_threads(),
            "setup": {"model": args.model, "batch": args.batch, "method": method,
                      "num_classes": num_classes, "attack_steps": args.attack_steps,
                      "awp": args.awp, "data": args.data, "steps_per_round": args.steps,
                      "repeats": args.repeats, **{f"speed.{k}": v for k, v in cfg["speed"].items()},
                      "baseline_workers": None if args.no_baseline else workers},
            "seconds_per_round": {k: [round(t, 4) for t in v] for k, v in seconds.items()},
            "forward_gflop_per_image": round(gflop, 5),
            "forward_units_per_image": units,
            "matmul_peak": matmul_peak_tflops(device, args.peak_size),
        }
        for name, times in seconds.items():
            ips = [args.steps * args.batch / t for t in times]
            median = statistics.median(ips)
            entry = {"images_per_s": round(median, 2), "min": round(min(ips), 2),
                     "max": round(max(ips), 2), "seconds_per_step": round(
                         statistics.median(times) / args.steps, 4)}
            if name in ("ours", "floor") and units is not None:
                entry["achieved_tflops"] = round(median * units * gflop / 1e3, 3)
            group, _, key = name.rpartition("/")
            (result.setdefault(group, {}) if group else result)[key] = entry
        # Ratios: the median over rounds of the two rows' time ratio within the round (both rows
        # ran seconds apart, so drift of the machine's speed cancels better than across rounds).
        def ratio(slow: str, fast: str) -> float:
            return statistics.median(a / b for a, b in zip(seconds[slow], seconds[fast]))

        r, ratios = result, {}
        if "baseline" in seconds:
            ratios["speedup_vs_baseline"] = ratio("baseline", "ours")
        if "floor" in seconds:
            ratios["overhead_vs_floor"] = ratio("ours", "floor")
        for group in ("attack", "data"):
            if f"{group}/baseline" in seconds:
                ratios[f"{group}_speedup_vs_baseline"] = ratio(f"{group}/baseline",
                                                               f"{group}/ours")
        for change in r.get("variant", {}):
            ratios[f"ours_vs_variant[{change}]"] = ratio(f"variant/{change}", "ours")
        if units is not None:
            ratios["ours_fraction_of_matmul_peak"] = \
                r["ours"]["achieved_tflops"] / r["matmul_peak"]["tflops"]
        result["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
        if args.autoattack:
            from .autoattack_stages import time_stages
            result["autoattack"] = time_stages(model, args.autoattack, device,
                                               target=args.aa_target, weights=args.aa_weights)
    return result


def table(r: dict) -> str:
    s = r["setup"]
    lines = [f"{r['device']}, torch {r['torch']}: {s['model']} batch {s['batch']}, {s['method']} "
             f"PGD-{s['attack_steps']}{' + AWP' if s['awp'] else ''}, attack "
             f"{s['speed.attack_precision']} / update {s['speed.update_precision']}, "
             f"channels_last {s['speed.channels_last']}, compile {s['speed.compile']}",
             f"{'':<40}{'images/s':>10}{'min':>9}{'max':>9}{'s/step':>9}{'TFLOP/s':>9}"]
    rows = [(k, r[k]) for k in ("ours", "baseline", "floor") if k in r]
    rows += [(f"ours, {k}", v) for k, v in r.get("variant", {}).items()]
    rows += [(f"attack only: {k}", v) for k, v in r.get("attack", {}).items()]
    rows += [(f"data only: {k}", v) for k, v in r.get("data", {}).items()]
    for name, e in rows:
        tflops = f"{e['achieved_tflops']:9.3f}" if "achieved_tflops" in e else f"{'':>9}"
        lines.append(f"{name:<40}{e['images_per_s']:>10.2f}{e['min']:>9.2f}{e['max']:>9.2f}"
                     f"{e['seconds_per_step']:>9.3f}{tflops}")
    lines.append("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ratios"].items())
                 + f"; matmul peak {r['matmul_peak']['tflops']:.2f} TFLOP/s "
                 f"({r['matmul_peak']['dtype']})")
    for stage in r.get("autoattack", {}).get("stages", []):
        rate = stage["images_per_s"]
        lines.append(f"AutoAttack {stage['attack']:<9} {stage['points']:>6} points "
                     f"{stage['seconds']:>9.2f}s " + (f"{rate:>9.2f} images/s" if rate else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    path = Path(args.json) if args.json else None
    try:
        if path is not None:  # before the benchmark: its figures are never lost to the disk
            if path.is_dir():
                raise RunError(f"--json {path} is a directory; name a file")
            check_writable(path.parent, "choose another --json")
        result = run(args)
        print(table(result))
        if path is not None:
            write_result(result, path)  # printed on stdout if the disk is full after all
            print(f"wrote {path}")
    except USER_ERRORS as err:
        return report("bench.at_step", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
