"""Learning-rate and attack-budget schedules against the reference values."""
import pytest
import torch

from at.config import load_config
from at.schedules import attack_budget, lr_at, momentum_at


def _optim(**kw):
    cfg = load_config()["optim"]
    cfg.update(kw)
    return cfg


def test_cosine_matches_the_dkl_reference_values():
    cfg = _optim(lr=0.2, epochs=200, schedule="cosine")
    # docs/reference.md#lr-schedules: e=1 0.19999, e=50 0.17099, e=100 0.10078, e=150 0.03012,
    # e=200 1.22e-5
    got = [lr_at(cfg, e) for e in (1, 50, 100, 150, 200)]
    assert got == pytest.approx([0.19999, 0.17099, 0.10078, 0.03012, 1.22e-5], abs=6e-6)


def test_warmup_then_cosine():
    cfg = _optim(lr=0.1, epochs=20, schedule="cosine", warmup_epochs=5)
    assert [lr_at(cfg, e) for e in (1, 2, 4)] == pytest.approx([0.02, 0.04, 0.08])
    assert lr_at(cfg, 5) == pytest.approx(0.1 * 0.5 * (1 + torch.cos(torch.tensor(0.0)).item()))
    assert lr_at(cfg, 20) < lr_at(cfg, 10) < lr_at(cfg, 5)


def test_piecewise():
    cfg = _optim(lr=0.1, epochs=100, schedule="piecewise", milestones=[75, 90], lr_decay=0.1)
    assert [lr_at(cfg, e) for e in (1, 74, 75, 89, 90, 100)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.parametrize("epochs", [10, 400])
def test_onecycle_equals_torch_stepped_per_epoch(epochs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, pct_start=0.025,
                                                total_steps=epochs, cycle_momentum=False)
    expected = []
    for _ in range(epochs):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cfg = _optim(lr=0.2, epochs=epochs, schedule="onecycle", onecycle_pct=0.025)
    assert [lr_at(cfg, e) for e in range(1, epochs + 1)] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("epochs", [10, 400])
def test_onecycle_momentum_cycling_equals_torch(epochs):
    """Wang et al.'s scheduler is OneCycleLR with its default momentum cycling (0.95 -> 0.85 ->
    0.95) on a Nesterov SGD, stepped once per epoch."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2, momentum=0.9,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, pct_start=0.025,
                                                total_steps=epochs)
    expected = []
    for _ in range(epochs):
        expected.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    cfg = _optim(lr=0.2, epochs=epochs, schedule="onecycle", onecycle_pct=0.025,
                 cycle_momentum=[0.85, 0.95])
    assert [momentum_at(cfg, e) for e in range(1, epochs + 1)] == pytest.approx(expected,
                                                                                rel=1e-12)
    assert min(expected) < 0.86 and max(expected) > 0.94
    assert momentum_at(_optim(momentum=0.9), 3) == 0.9  # cycle_momentum null: constant


def test_unknown_schedule():
    with pytest.raises(ValueError, match="valid"):
        lr_at(_optim(schedule="linear"), 1)
    with pytest.raises(ValueError, match="valid"):
        attack_budget({**load_config()["attack"], "schedule": "high"}, 1, 10)


def test_attack_budgets():
    base = {**load_config()["attack"], "eps": 8 / 255}
    fixed = attack_budget({**base, "schedule": "fixed", "steps": 10, "step_size": 2 / 255}, 3, 10)
    assert (fixed.eps, fixed.steps, fixed.step_size) == (8 / 255, 10, 2 / 255)
    ramp = attack_budget({**base, "schedule": "fixed", "eps_ramp": True, "steps": 10,
                          "step_size": 2 / 255}, 50, 200)
    assert ramp.eps == pytest.approx(2 / 255) and ramp.step_size == pytest.approx(0.5 / 255)
    # What the DKL code runs: 5 steps of eps_t / 2 in every epoch, eps_t = eps * e / E.
    for epoch in (1, 50, 120, 200):
        b = attack_budget({**base, "schedule": "dkl_high", "eps_ramp": True}, epoch, 200)
        assert b.steps == 5 and b.eps == pytest.approx(8 / 255 * epoch / 200)
        assert b.step_size == pytest.approx(b.eps / 2)
    # The intended reading: 2/3/4/5 steps over the four quarters (thresholds scale with epochs).
    steps = [attack_budget({**base, "schedule": "dkl_high_intended", "eps_ramp": True}, e, 100)
             for e in (1, 25, 26, 50, 51, 75, 76, 100)]
    assert [b.steps for b in steps] == [2, 2, 3, 3, 4, 4, 5, 5]
    ratios = [b.step_size / b.eps for b in steps]
    assert ratios == pytest.approx([1, 1, 2 / 3, 2 / 3, 0.5, 0.5, 0.5, 0.5])
