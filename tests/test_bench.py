"""The training-step benchmark (bench/at_step.py): a smoke run at tiny size, and the pass counts
that its floor and the speed-up over the reference-style baseline rest on, counted in FLOPs."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import models
from at.config import load_config
from at.methods import build_method
from attacks import frozen
from bench import at_step
from bench.floor import FloorStep, forward_units
from bench.reference_step import ReferenceStep, naive_ikl


@pytest.mark.slow
def test_harness_smoke_run_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "result.json"
    code = at_step.main(["--model", "wrn-16-1", "--batch", "8", "--attack-steps", "2",
                         "--steps", "2", "--repeats", "1", "--awp", "--device", "cpu",
                         "--peak-size", "512", "--json", str(out)])  # as the tiny device check
    assert code == 0
    r = json.loads(out.read_text())
    assert r["torch"] == torch.__version__ and r["device"] and r["device_type"] == "cpu"
    for key in ("ours", "baseline", "floor"):
        assert r[key]["images_per_s"] > 0
    assert set(r["attack"]) == {"ours", "baseline"}
    assert r["setup"]["method"] == "ikl_at" and r["setup"]["num_classes"] == 100
    assert r["forward_units_per_image"] == 1 + 2 * 2 + 6 + 6
    assert r["ratios"]["speedup_vs_baseline"] == pytest.approx(
        r["ours"]["images_per_s"] / r["baseline"]["images_per_s"], rel=1e-2)
    assert "ours" in capsys.readouterr().out


@pytest.mark.slow
def test_harness_refuses_bad_input_in_one_line(capsys):
    assert at_step.main(["--model", "wrn-16-100", "--device", "cpu", "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model (model.name) 'wrn-16-100'" in err[0]


class _FlopCount(TorchDispatchMode):
    """FLOPs of the convolutions and matrix products run inside, forward and backward, by
    torch's own per-operator formulas (FlopCounterMode itself refuses torch.autograd.grad)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


def _flops(fn) -> int:
    with _FlopCount() as counter:
        fn()
    return counter.total


@pytest.mark.parametrize("method,awp", [("ikl_at", True), ("trades", False), ("pgd_at", False)])
def test_floor_passes_match_the_flop_model(method, awp):
    """The floor runs exactly forward_units forward-equivalents (docs/performance.md#step-cost)."""
    torch.manual_seed(0)
    model = models.build_model("wrn-16-1", 10)
    x = torch.rand(4, 3, 32, 32)
    settings = load_config(None)["speed"]
    step = FloorStep(model, method, steps=3, awp=awp, settings=settings,
                     device=torch.device("cpu"))
    forward = _flops(lambda: model.eval()(x[:1]))
    assert _flops(lambda: step(x)) == pytest.approx(
        forward_units(method, 3, awp) * forward * len(x), rel=0.02)


def test_our_attack_computes_the_natural_logits_once_the_reference_every_step():
    """IKL-AT's attack: ours costs (1 + 2K) F per image, the reference-style one 3K F; both
    craft the same perturbation (float64, same random start)."""
    torch.manual_seed(0)
    cfg = load_config(None, ["attack.steps=4", "method.ikl_at.attack_beta=1.0"])
    model = models.build_model("wrn-16-1", 10).double()
    method = build_method(cfg["method"], 10).double()
    reference = ReferenceStep(model, cfg, 10, awp=False)
    method.prior.copy_(torch.rand(10, 10, dtype=torch.float64).softmax(1))
    reference.prior = method.prior.clone()
    x, y = torch.rand(4, 3, 32, 32, dtype=torch.float64), torch.arange(4)
    from at.schedules import AttackBudget
    budget = AttackBudget(eps=8 / 255, step_size=2 / 255, steps=4, init="normal",
                          clamp_init=False)
    with frozen(model):
        forward = _flops(lambda: model(x[:1]))
    torch.manual_seed(1)
    ours = method.perturb(model, x, y, budget)
    torch.manual_seed(1)
    theirs = reference.perturb(x, y)
    assert torch.equal(ours, theirs)
    assert _flops(lambda: method.perturb(model, x, y, budget)) == pytest.approx(
        (1 + 2 * 4) * forward * len(x), rel=0.02)
    assert _flops(lambda: reference.perturb(x, y)) == pytest.approx(
        3 * 4 * forward * len(x), rel=0.02)


def test_naive_pairwise_ikl_equals_the_closed_form_used_in_training():
    from at.losses import ikl_loss
    torch.manual_seed(0)
    z_adv, z_nat = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)
    w = torch.rand(6, 7, dtype=torch.float64).softmax(1)
    for version, gamma in (("v1", 1.0), ("v2", 0.5)):
        assert torch.allclose(naive_ikl(z_adv, z_nat, w, 3.0, 20.0, version, gamma),
                              ikl_loss(z_adv, z_nat, w, alpha=3.0, beta=20.0, gamma=gamma,
                                       version=version), rtol=1e-12)


def test_evaluation_batch_size_auto_and_its_validation():
    import argparse

    from eval.common import CPU_BATCH, _batch_size, auto_batch_size
    model = models.build_model("wrn-16-1", 10).eval()
    assert auto_batch_size(model, torch.device("cpu")) == CPU_BATCH
    assert _batch_size("auto") == "auto" and _batch_size("250") == 250
    for bad in ("0", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            _batch_size(bad)


@pytest.mark.slow
def test_imagenet_data_bench_smoke_run(tmp_path):
    from bench import imagenet_data
    out = tmp_path / "data.json"
    assert imagenet_data.main(["--images", "48", "--batch", "8", "--workers", "1", "--rounds",
                               "1", "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ours"] > 0 and r["reference"] > 0 and r["images"] == 48
    assert r["ratio_ours_vs_reference"] == pytest.approx(r["ours"] / r["reference"])
    assert imagenet_data.main(["--root", str(tmp_path / "none"), "--device", "cpu"]) == 1


@pytest.mark.slow
def test_single_step_variants_are_timed_beside_pgd(tmp_path):
    out = tmp_path / "result.json"
    assert at_step.main(["--model", "wrn-16-1", "--batch", "8", "--attack-steps", "2",
                         "--steps", "1", "--repeats", "1", "--device", "cpu", "--single-step",
                         "--skip", "baseline,floor,attack,data", "--peak-size", "512",
                         "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["variant"]) == set(at_step.SINGLE_STEP_VARIANTS)
    for change in at_step.SINGLE_STEP_VARIANTS:
        assert r["variant"][change]["images_per_s"] > 0
        assert r["ratios"][f"ours_vs_variant[{change}]"] > 0
