"""RobustBench zoo entries as targets (eval.zoo_target, eval.zoo), confidence intervals
(eval.confidence) and randomised defences (eval.randomized), offline on the CPU.

Two real zoo entries get state dicts of their real architectures (robustbench's own classes,
seeded random weights) at RobustBench's local paths: Ding2020MMA (a WideResNet-28-4) and
Wong2020Fast (a PreAct ResNet-18), both CIFAR-10 L-inf. The test images are fake CIFAR-10 files
in the real on-disk format, labelled so that each model classifies at least one correctly (the
attacks then have something to attack).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eval import autoattack as aa_eval
from eval import confidence, randomized, zoo
from eval import pgd as pgd_eval
from eval.common import any_target
from eval.robustbench_import import robustbench

# Imported by path, not as tests.fake_cifar (robustbench's wheel installs a top-level `tests`).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_cifar import write_fake_cifar  # noqa: E402

if importlib.util.find_spec("robustbench") is None:
    pytest.skip("robustbench is not installed (requirements-zoo.txt)", allow_module_level=True)

ENTRIES = ("Wong2020Fast", "Ding2020MMA")   # a PreAct ResNet-18, a WideResNet-28-4
N_TEST = 4
N_ZOO = 2  # images eval.zoo evaluates: image i is right for entry i
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Zoo:
    model_dir: Path
    data_root: Path
    x: torch.Tensor


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    rb = robustbench()  # imported here, not at collection: the import takes seconds
    base = tmp_path_factory.mktemp("zoo")
    model_dir = base / "models"
    entries = rb.model_dicts[rb.BenchmarkDataset("cifar10")][rb.ThreatModel("Linf")]
    folder = model_dir / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    for i, name in enumerate(ENTRIES):
        torch.manual_seed(i)
        torch.save(entries[name]["model"]().state_dict(), folder / f"{name}.pt")
    # Images first, then labels: image i is labelled with entry i's prediction.
    images = write_fake_cifar(str(base / "data"), "cifar10", n_train=10, n_test=N_TEST)["test_x"]
    x = torch.from_numpy(images).float() / 255
    labels = [int(rb.load_model(name, str(model_dir), "cifar10", "Linf").eval()(x[i:i + 1])
                  .argmax()) for i, name in enumerate(ENTRIES)]
    write_fake_cifar(str(base / "data"), "cifar10", n_train=10, n_test=N_TEST, test_labels=labels)
    return Zoo(model_dir, base / "data", x)


# --------------------------------------------------------------------------- intervals

def _tail_at_least(k, n, p):
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_clopper_pearson_ends_are_the_exact_binomial_tails():
    for k, n in ((0, 10), (3, 10), (10, 10), (11, 100), (57, 100), (4, 24)):
        low, high = confidence.interval(k, n)
        # The literal definition: P(X >= k | low) = 2.5 %, P(X <= k | high) = 2.5 %.
        if k > 0:
            assert _tail_at_least(k, n, low / 100) == pytest.approx(0.025, abs=2e-4)
        else:
            assert low == 0
        if k < n:
            assert 1 - _tail_at_least(k + 1, n, high / 100) == pytest.approx(0.025, abs=2e-4)
        else:
            assert high == 100
        assert low <= 100 * k / n <= high
    with pytest.raises(ValueError):
        confidence.interval(5, 4)


def test_thresholds_are_compared_by_interval():
    # The digits case of the issue: an 11-point gap on 100 images against a 10-point threshold.
    assert confidence.against_threshold(11.0, 100, 10.0)[0] == "inconclusive"
    assert confidence.against_threshold(30.0, 100, 10.0)[0] == "warn"
    assert confidence.against_threshold(2.0, 100, 10.0)[0] == "pass"
    assert confidence.against_threshold(1.0, 100, 0.0)[0] == "warn"   # one point is proof
    assert confidence.against_threshold(0.0, 4, 0.0)[0] == "pass"
    assert confidence.outside(43.21, (0.0, 60.24)) is False
    assert confidence.outside(90.0, (0.0, 60.24)) is True
    checks = [{"name": "convergence", "status": "warn", "value": 11.0, "threshold": 10.0,
               "unit": "pp", "explanation": ""},
              {"name": "determinism", "status": "pass", "value": 0.0, "threshold": 1e-4,
               "unit": "", "explanation": ""}]
    assert confidence.qualify_checks(checks, 100, 90) == "inconclusive"
    assert checks[0]["status"] == "inconclusive" and "n = 100" in checks[0]["explanation"]
    from eval.audit import CHECKS
    assert set(confidence.SHARE_CHECKS) <= set(CHECKS)  # the names qualified are the audit's


# --------------------------------------------------------------------------- targets

def test_rb_targets_give_robustbench_load_model_logits(zoo_dir, tmp_path):
    rb = robustbench()
    for name in ENTRIES:
        t = any_target(f"rb:cifar10/Linf/{name}", model_dir=zoo_dir.model_dir, device="cpu")
        theirs = rb.load_model(name, str(zoo_dir.model_dir), "cifar10", "Linf").eval()
        with torch.no_grad():
            assert torch.equal(t.model(zoo_dir.x), theirs(zoo_dir.x)), name
        assert t.out_dir == zoo_dir.model_dir.parent / "zoo" / "cifar10_Linf" / name
        assert t.claim["architecture"] in ("PreActResNet-18", "WideResNet-28-4")
    # rb:Name with --dataset/--threat is the same entry; --out moves the results.
    t = any_target("rb:Wong2020Fast", dataset="cifar10", threat="Linf",
                   model_dir=zoo_dir.model_dir, device="cpu", out=tmp_path / "o")
    assert t.name == "Wong2020Fast" and t.out_dir == tmp_path / "o"
    code = pgd_eval.main(["rb:cifar10/Linf/Wong2020Fast", "--model-dir", str(zoo_dir.model_dir),
                          "--data-root", str(zoo_dir.data_root), "--device", "cpu", "--n-ex", "2",
                          "--steps", "1", "--out", str(tmp_path / "pgd")])
    assert code == 0
    result = json.loads(next((tmp_path / "pgd").glob("pgd1_linf_*_n2_rb.json")).read_text())
    assert result["arch"] == "PreActResNet-18" and result["dataset"] == "cifar10"


def _one_line_error(capsys, code, needle):
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "Warning" not in line
             and not line.startswith("  ")]
    assert code == 1 and len(lines) == 1 and needle in lines[0], err
    return lines[0]


def test_bad_zoo_inputs_are_one_line_errors(zoo_dir, tmp_path, capsys, monkeypatch):
    common = ["--data-root", str(zoo_dir.data_root), "--device", "cpu", "--n-ex", "2",
              "--steps", "1", "--out", str(tmp_path / "o")]

    def pgd(target, model_dir=zoo_dir.model_dir, *extra):
        return pgd_eval.main([target, "--model-dir", str(model_dir), *common, *extra])

    line = _one_line_error(capsys, pgd("rb:cifar10/Linf/Wong2020fast"), "unknown RobustBench")
    assert "'Wong2020Fast'" in line
    _one_line_error(capsys, pgd("rb:cifar10/L2/Wong2020Fast"), "use rb:cifar10/Linf/Wong2020Fast")
    _one_line_error(capsys, pgd("rb:cifar10/Linf"), "cannot read")

    # Weights of another architecture, a truncated file, an HTML page at the zoo path.
    other = tmp_path / "other" / "cifar10" / "Linf"
    other.mkdir(parents=True)
    real = (zoo_dir.model_dir / "cifar10" / "Linf" / "Wong2020Fast.pt").read_bytes()
    (other / "Ding2020MMA.pt").write_bytes(real)
    _one_line_error(capsys, pgd("rb:cifar10/Linf/Ding2020MMA", other.parent.parent),
                    "another architecture")
    (other / "Wong2020Fast.pt").write_bytes(real[:len(real) // 2])
    _one_line_error(capsys, pgd("rb:cifar10/Linf/Wong2020Fast", other.parent.parent),
                    "truncated")
    (other / "Wong2020Fast.pt").write_text("<!DOCTYPE html><html>Google Drive quota</html>")
    _one_line_error(capsys, pgd("rb:cifar10/Linf/Wong2020Fast", other.parent.parent),
                    "HTML page")

    # No file and no network (a proxy that refuses): the error names where to put the file.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    line = _one_line_error(capsys, pgd("rb:cifar10/Linf/Sehwag2020Hydra", other.parent.parent),
                           "could not be downloaded")
    assert str(other / "Sehwag2020Hydra.pt") in line

    # ImageNet without a data root; more images than the test set has.
    code = pgd_eval.main(["rb:imagenet/Linf/Wong2020Fast", "--model-dir", str(tmp_path / "none"),
                          "--device", "cpu"])
    _one_line_error(capsys, code, "--data-root")
    code = zoo.main(["cifar10", "Linf", "--names", "Wong2020Fast", "--n-ex", "100",
                     "--model-dir", str(zoo_dir.model_dir), "--data-root", str(zoo_dir.data_root),
                     "--out", str(tmp_path / "z")])
    _one_line_error(capsys, code, "n_examples must be in [1, 4]")
    code = zoo.main(["cifar10", "Linf", "--n-ex", "2", "--model-dir", str(zoo_dir.model_dir)])
    _one_line_error(capsys, code, "one of --names A,B, --all or --top K")

    # robustbench (or one of its dependencies) missing: what to install.
    from eval import robustbench_import
    robustbench_import.robustbench.cache_clear()
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    try:
        _one_line_error(capsys, pgd("rb:cifar10/Linf/Wong2020Fast"),
                        "pip install -r requirements-zoo.txt")
    finally:
        monkeypatch.undo()
        robustbench_import.robustbench.cache_clear()


def test_top_k_follows_the_claimed_robust_accuracy():
    top = zoo.select("cifar100", "Linf", None, False, 3)
    claims = [zoo.zt.claimed_robust(zoo.zt.claim_of("cifar100", "Linf", n)) for n in top]
    assert len(top) == 3 and claims == sorted(claims, reverse=True)
    assert zoo.zt.claims()["commit"] and len(zoo.zt.claims()["commit"]) == 40


# --------------------------------------------------------------------------- randomised

class DropoutNet(nn.Module):
    """A linear classifier whose dropout stays active in eval mode: a randomised defence."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(F.dropout(x.flatten(1), p=0.3, training=True))


def test_randomised_model_gets_the_rand_version_and_draws(zoo_dir, tmp_path):
    from at.target import Target
    model = DropoutNet().eval()
    x = zoo_dir.x
    with torch.no_grad():  # label the images with the model's own (noisy) votes
        labels = torch.stack([model(x).argmax(1) for _ in range(15)]).mode(0).values
    root = tmp_path / "data"
    write_fake_cifar(str(root), "cifar10", n_train=10, n_test=N_TEST, test_labels=labels.numpy())
    t = Target(model, "dropout-linear", "cifar10", "none", tmp_path / "m.pt", "dropout",
               tmp_path / "eval", str(root))
    r = aa_eval.evaluate(t, n_ex=N_TEST, eps="2/255", batch_size=N_TEST, progress=False)
    assert r["version"] == "rand" and r["attacks"] == aa_eval.stage_names("rand", "Linf")
    assert r["version_switched"]["requested"] == "standard"
    assert "forward passes" in r["version_switched"]["why"]
    rand = r["randomized"]
    assert rand["draws"] == randomized.DRAWS
    assert rand["worst_acc"] == r["robust_acc"] <= rand["mean_acc"] <= 100
    assert "autoattack-rand_linf" in r["path"]
    # A deterministic model keeps the standard version.
    det = Target(nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)).eval(), "linear", "cifar10",
                 "none", tmp_path / "d.pt", "linear", tmp_path / "eval_det", str(root))
    r = aa_eval.evaluate(det, n_ex=2, batch_size=2, progress=False, attacks=["apgd-ce"])
    assert r["randomized"] is None and r["version_switched"] is None


# --------------------------------------------------------------------------- eval.zoo

def _zoo_args(zoo_dir, out):
    return ["cifar10", "Linf", "--names", ",".join(ENTRIES), "--n-ex", str(N_ZOO), "--attacks",
            "apgd-ce", "--model-dir", str(zoo_dir.model_dir), "--data-root",
            str(zoo_dir.data_root), "--device", "cpu", "--batch-size", "4", "--out", str(out)]


@pytest.mark.slow
def test_zoo_table_killed_and_resumed(zoo_dir, tmp_path, capsys):
    from eval.summary import main as summary_main
    out = tmp_path / "zoo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    first = out / "cifar10_Linf" / ENTRIES[0] / f"zoo_row_eps8-255_n{N_ZOO}.json"
    # Killed as a process (SIGKILL: nothing of it runs after); everything after runs in this
    # process (main() as the command line calls it), which saves the interpreter starts.
    proc = subprocess.Popen([sys.executable, "-m", "eval.zoo", *_zoo_args(zoo_dir, out)],
                            cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # killed while the second entry runs
    proc.wait()
    row = json.loads(first.read_text())
    assert not (out / "cifar10_Linf" / f"zoo_eps8-255_n{N_ZOO}.md").exists()

    capsys.readouterr()
    assert zoo.main(_zoo_args(zoo_dir, out)) == 0, capsys.readouterr().err[-2000:]
    assert json.loads(first.read_text()) == row  # the finished entry was not redone
    table = json.loads((out / "cifar10_Linf" / f"zoo_eps8-255_n{N_ZOO}.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == list(ENTRIES)
    for name, r in rows.items():
        claim = zoo.zt.claim_of("cifar10", "Linf", name)
        assert r["claimed_clean"] == claim["clean"] and r["claimed_aa"] == claim["autoattack"]
        assert r["clean"] >= 100 / N_ZOO  # the labels make one image right
        assert r["aa"] <= r["clean"] and r["clean_ci95"][0] <= r["clean"] <= r["clean_ci95"][1]
        assert r["aa_minus_claim"] == round(r["aa"] - claim["autoattack"], 2)
        assert r["claim_outside_ci"]["aa"] == (not r["aa_ci95"][0] <= claim["autoattack"]
                                               <= r["aa_ci95"][1])
        assert r["audit"] in ("pass", "inconclusive", "warn") and r["seconds"] > 0
        assert Path(r["autoattack_json"]).is_file() and Path(r["audit_json"]).is_file()
    md = (out / "cifar10_Linf" / f"zoo_eps8-255_n{N_ZOO}.md").read_text()
    assert all(f"| {name} |" in md for name in ENTRIES) and "78fcc9e48a07" in md
    csv_lines = (out / "cifar10_Linf" / f"zoo_eps8-255_n{N_ZOO}.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(zoo.COLUMNS) and len(csv_lines) == 3
    print(md)

    # Shards skip finished entries; --merge builds the same table; the summary reads an entry.
    for extra in (["--shard", "1/2"], ["--merge"]):
        assert zoo.main(_zoo_args(zoo_dir, out) + extra) == 0, capsys.readouterr().err[-2000:]
    assert json.loads(first.read_text()) == row
    capsys.readouterr()
    code = summary_main([f"rb:cifar10/Linf/{ENTRIES[1]}", "--model-dir", str(tmp_path / "models")])
    summary = capsys.readouterr()
    assert code == 0 and "AA apgd-ce" in summary.out, summary.err
