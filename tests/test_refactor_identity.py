"""Refactors keep the numbers: a short, deterministic digits run (IKL-AT with AWP and weight
averaging, two epochs) must reproduce the recorded weights, optimizer and method state, loader
state, metrics and final results.

The golden file records, per tensor of last.pt and best.pt, the sha256 of its raw bytes and its
float64 sum. The run takes place in a child process with the CPU kernels pinned to their portable
code paths (PINNED: ATen's default kernels, oneDNN at SSE4.1, MKL in its compatible mode, one
thread), because float32 results otherwise depend on the instruction set: an AVX2 and an AVX-512
machine train apart after a few steps. With the recorded torch version and pinned capability the
hashes must match exactly (bit-identical); elsewhere the sums must agree to a relative 1e-5.

Re-record (only when a change is *meant* to change the numbers):
    python tests/test_refactor_identity.py --record
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from at.config import REPO_ROOT, load_config  # noqa: E402
from at.trainer import fit  # noqa: E402

GOLDEN = Path(__file__).with_name("golden") / "refactor_identity.json"
CONFIG = REPO_ROOT / "configs" / "digits" / "ikl_at_awp.yaml"
# Two epochs of four steps (200 training images: the other 1,237 validate, at the last epoch),
# AWP from the first, an epoch EMA, a short attack and validation PGD; no time-based mid-epoch
# checkpoints (they would depend on the clock). The portable kernels are slow: every image counts.
OVERRIDES = ["optim.epochs=2", "awp.warmup=1", "attack.schedule=fixed", "attack.steps=1",
             "attack.step_size=8/255", "eval.pgd_steps=1", "eval.every=2", "eval.n_test=100",
             "eval.final_pgd=false", "log.plot=false", "data.val_size=1237",
             "checkpoint.every_minutes=0", "device=cpu", "model.name=wrn-16-1",
             "optim.batch_size=64", "optim.lr=0.05"]
PINNED = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE",
          "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
          "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
# Wall-clock measurements and paths differ between runs by nature.
VOLATILE = {"images_per_s", "config", "seconds"}


def _volatile(key) -> bool:
    return str(key) in VOLATILE or str(key).endswith("_seconds")
RTOL = 1e-5


def _digest(obj, prefix: str, out: dict) -> None:
    """Flatten a checkpoint: tensors -> {sha256, sum, dtype, shape}; other leaves as they are."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not _volatile(k):
                _digest(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _digest(v, f"{prefix}[{i}]", out)
    elif torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        out[prefix] = {"sha256": hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()
                                                if t.numel() else b"").hexdigest(),
                       "sum": t.double().sum().item(), "dtype": str(t.dtype),
                       "shape": list(t.shape)}
    else:
        out[prefix] = obj


def run_and_digest(out_dir: Path) -> dict:
    """Train the short run into `out_dir` in a child process with PINNED kernels; returns what
    the golden file holds."""
    digest = out_dir.with_name(out_dir.name + ".json")
    child = subprocess.run([sys.executable, __file__, "--digest", str(out_dir), str(digest)],
                           env={**os.environ, **PINNED}, cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=3600)  # CPU-starved machines are slow
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(digest.read_text())


def _train_and_digest(out_dir: Path) -> dict:
    """The child process's part: train into `out_dir` on one thread and digest the result."""
    torch.set_num_threads(1)  # the reduction order of CPU kernels depends on the thread count
    fit(load_config(CONFIG, [*OVERRIDES, f"out_dir={out_dir}"]))
    tensors: dict = {}
    for name in ("last.pt", "best.pt"):
        _digest(torch.load(out_dir / name, map_location="cpu", weights_only=True), name, tensors)
    metrics = [{k: v for k, v in json.loads(line).items() if not _volatile(k)}
               for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "overrides": OVERRIDES, "checkpoints": tensors, "metrics": metrics,
            "final": json.loads((out_dir / "final.json").read_text())}


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-8)
    return a == b


def compare(golden: dict, got: dict) -> list[str]:
    """Differences between a recorded and a fresh digest (empty when they agree)."""
    exact = (golden["torch"], golden["cpu_capability"]) == (got["torch"], got["cpu_capability"])
    problems = []
    g, n = golden["checkpoints"], got["checkpoints"]
    for key in sorted(g.keys() | n.keys()):
        if key not in g or key not in n:
            problems.append(f"{key}: only in {'golden' if key in g else 'this run'}")
            continue
        a, b = g[key], n[key]
        if isinstance(a, dict) and "sha256" in a and isinstance(b, dict):
            if (a["dtype"], a["shape"]) != (b["dtype"], b["shape"]):
                problems.append(f"{key}: {a['dtype']}{a['shape']} != {b['dtype']}{b['shape']}")
            elif exact and a["sha256"] != b["sha256"]:
                problems.append(f"{key}: sha256 differs (sum {a['sum']!r} -> {b['sum']!r})")
            elif not _close(a["sum"], b["sum"]):
                problems.append(f"{key}: sum {a['sum']!r} -> {b['sum']!r}")
        elif not (a == b if exact else _close(a, b)):
            problems.append(f"{key}: {a!r} -> {b!r}")
    if len(golden["metrics"]) != len(got["metrics"]):
        problems.append(f"metrics: {len(golden['metrics'])} -> {len(got['metrics'])} epochs")
    rows = [(f"metrics[{i}]", a, b) for i, (a, b) in enumerate(zip(golden["metrics"],
                                                                     got["metrics"]))]
    rows += [(f"final.{name}", golden["final"].get(name, {}), got["final"].get(name, {}))
             for name in sorted(golden["final"].keys() | got["final"].keys())]
    for where, a, b in rows:
        for key in sorted(a.keys() | b.keys()):
            if not (a.get(key) == b.get(key) if exact else _close(a.get(key), b.get(key))):
                problems.append(f"{where}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return problems


@pytest.mark.slow
@pytest.mark.identity
def test_short_run_reproduces_the_recorded_numbers(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = run_and_digest(tmp_path / "run")
    assert golden["overrides"] == OVERRIDES, "re-record the golden file after changing OVERRIDES"
    problems = compare(golden, got)
    assert not problems, "\n".join(problems[:20])


def test_the_comparison_can_fail():
    golden = json.loads(GOLDEN.read_text())
    bent = json.loads(json.dumps(golden))
    key = next(k for k, v in bent["checkpoints"].items() if isinstance(v, dict) and "sum" in v
               and v["sum"] != 0)
    bent["checkpoints"][key]["sum"] *= 1 + 1e-4
    bent["checkpoints"][key]["sha256"] = "0" * 64
    assert any(p.startswith(key) for p in compare(golden, bent))
    bent = json.loads(json.dumps(golden))
    bent["metrics"][-1]["loss"] += 1e-3
    assert any("loss" in p for p in compare(golden, bent))
    bent = json.loads(json.dumps(golden))
    bent["final"]["best"]["test_clean_acc"] += 0.5
    assert any(p.startswith("final.best.test_clean_acc") for p in compare(golden, bent))


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="record or check the refactor-identity run")
    parser.add_argument("--record", action="store_true", help="write the golden file")
    parser.add_argument("--digest", nargs=2, metavar=("OUT_DIR", "JSON"),
                        help="(the child process) train into OUT_DIR, write the digest to JSON")
    args = parser.parse_args()
    if args.digest:
        result = _train_and_digest(Path(args.digest[0]))
        Path(args.digest[1]).write_text(json.dumps(result))
        sys.exit(0)
    with tempfile.TemporaryDirectory() as tmp:
        digest = run_and_digest(Path(tmp) / "run")
    if args.record:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(digest, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        problems = compare(json.loads(GOLDEN.read_text()), digest)
        print("\n".join(problems) or "identical")
        sys.exit(1 if problems else 0)
