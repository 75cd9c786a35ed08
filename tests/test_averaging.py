"""Weight averaging (at/averaging.py) against hand-computed averages of recorded weights, on CPU."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import models
from at import averaging
from at.averaging import WeightAverage


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build_model("wrn-16-1", 10)


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def _sgd_step(model, optimizer, x, y) -> None:
    model.train()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _params(model) -> list[torch.Tensor]:
    return [p.detach().double().clone() for p in model.parameters()]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=0, atol=1e-6)


def _wang_decay(global_step: int, tau: float, warmup: float) -> float:
    """Wang et al.'s ema_update decay, written as theirs: `global_step` is their counter after
    the increment that follows the optimizer step (1 for the first step)."""
    factor = int(global_step >= warmup)
    delta = global_step - warmup
    decay = min(tau, (1. + delta) / (10. + delta)) if 10. + delta != 0 else tau
    return decay * factor


def test_step_ema_matches_hand_computed_ema_and_copies_buffers():
    tau, warmup, steps_per_epoch = 0.5, 3.5, 7
    model = _model()
    opt = _optimizer(model)
    avg = WeightAverage(model, "step_ema", tau, warmup_steps=warmup)
    initial = _params(model)
    snapshots, step = [], 0
    batches = _batches(2 * steps_per_epoch)
    for epoch in (1, 2):
        for x, y in batches[(epoch - 1) * steps_per_epoch:epoch * steps_per_epoch]:
            _sgd_step(model, opt, x, y)
            step += 1
            avg.update_step(model, step)
            snapshots.append(_params(model))
        stale = [b.clone() for b in avg.module.buffers()]
        avg.update_epoch(model, epoch)
        live = list(model.buffers())
        # There was something to copy, and it is copied, not aliased.
        assert any(not torch.equal(s, v) for s, v in zip(stale, live))
        for own, theirs in zip(avg.module.buffers(), live):
            assert torch.equal(own, theirs) and own.data_ptr() != theirs.data_ptr()

    ema, decays = initial, []
    for global_step, snap in enumerate(snapshots, start=1):
        d = _wang_decay(global_step, tau, warmup)
        decays.append(d)
        ema = [d * e + (1 - d) * t for e, t in zip(ema, snap)]
    # All three regimes: warm-up (EMA := model), dynamic decay, capped at tau.
    assert decays[:3] == [0.0] * 3 and 0 < decays[3] < tau and decays[-1] == tau
    for got, want in zip(avg.module.parameters(), ema):
        assert _close(got, want)
    assert avg.ready and avg.updates == len(snapshots)
    # The buffers copied at epoch end do not follow the live model afterwards (copy, no alias).
    _sgd_step(model, opt, *batches[0])
    assert any(not torch.equal(a, b) for a, b in zip(avg.module.buffers(), model.buffers()))


def test_epoch_ema_matches_swa_py_over_params_and_bn_buffers():
    model = _model()
    opt = _optimizer(model)
    from_1 = WeightAverage(model, "epoch_ema", 0.9, start=1)
    from_3 = WeightAverage(model, "epoch_ema", 0.9, start=3)
    initial = _state(model)
    thetas = []
    batches = _batches(8)
    for epoch in range(1, 5):
        for x, y in batches[2 * (epoch - 1):2 * epoch]:
            _sgd_step(model, opt, x, y)
        thetas.append(_state(model))
        from_1.update_epoch(model, epoch)
        from_3.update_epoch(model, epoch)
        assert from_1.ready
        assert from_3.ready == (epoch >= 3)
        if epoch < 3:  # not defined yet: nothing was averaged into the module
            assert all(torch.equal(v, initial[k]) for k, v in from_3.module.state_dict().items())

    def swa_py(states):
        avg = {k: v.double() for k, v in states[0].items()}
        for theta in states[1:]:
            avg = {k: 0.1 * theta[k].double() + 0.9 * avg[k] for k in avg}
        return avg

    for avg, states in ((from_1, thetas), (from_3, thetas[2:])):
        want, got = swa_py(states), avg.module.state_dict()
        assert got.keys() == want.keys()
        floats = [k for k, v in got.items() if v.is_floating_point()]
        assert any("running_mean" in k for k in floats) and any("running_var" in k for k in floats)
        for k in floats:
            assert _close(got[k], want[k]), k
        for k in got.keys() - set(floats):  # num_batches_tracked: copied from the last epoch
            assert torch.equal(got[k], thetas[-1][k]), k
    assert from_1.updates == 4 and from_3.updates == 2
    # Steps are ignored by epoch_ema.
    before = _state(from_1.module)
    from_1.update_step(model, 100)
    assert all(torch.equal(v, before[k]) for k, v in from_1.module.state_dict().items())


@pytest.mark.parametrize("kind,start", [("step_ema", 1), ("epoch_ema", 1), ("epoch_ema", 2)])
def test_state_dict_round_trip_gives_identical_further_updates(kind, start):
    model = _model()
    opt = _optimizer(model)
    avg = WeightAverage(model, kind, 0.8, start=start, warmup_steps=2)
    batches = _batches(8)
    step, resumed = 0, None
    for epoch in range(1, 5):
        for x, y in batches[2 * (epoch - 1):2 * epoch]:
            _sgd_step(model, opt, x, y)
            step += 1
            for a in (avg, resumed):
                if a is not None:
                    a.update_step(model, step)
        for a in (avg, resumed):
            if a is not None:
                a.update_epoch(model, epoch)
        if epoch == 1:  # "kill" after epoch 1, resume into an average built from other weights
            buf = io.BytesIO()
            torch.save(avg.state_dict(), buf)
            buf.seek(0)
            resumed = WeightAverage(_model(seed=5), kind, 0.8, start=start, warmup_steps=2)
            resumed.load_state_dict(torch.load(buf, weights_only=True))
            assert resumed.ready == avg.ready == (start == 1 or kind == "step_ema")
    mine, theirs = avg.state_dict(), resumed.state_dict()
    assert {k: v for k, v in mine.items() if k != "model"} == \
        {k: v for k, v in theirs.items() if k != "model"}
    assert all(torch.equal(v, theirs["model"][k]) for k, v in mine["model"].items())
    assert not any(torch.equal(v, model.state_dict()[k])
                   for k, v in mine["model"].items() if k.endswith("conv1.weight"))
    other = WeightAverage(model, "epoch_ema" if kind == "step_ema" else "step_ema", 0.8)
    with pytest.raises(ValueError, match="kind"):
        other.load_state_dict(mine)


def test_averaged_module_is_a_frozen_eval_copy_with_different_logits():
    model = _model()
    opt = _optimizer(model)
    avg = WeightAverage(model, "step_ema", 0.9)
    assert not avg.module.training and avg.module is not model
    for step, (x, y) in enumerate(_batches(4), start=1):
        _sgd_step(model, opt, x, y)
        avg.update_step(model, step)
    avg.update_epoch(model, 1)
    assert model.training and not avg.module.training
    assert all(not p.requires_grad and p.grad is None for p in avg.module.parameters())
    assert all(p.grad is not None for p in model.parameters())
    x = _batches(1, seed=9)[0][0]
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(avg.module(x), model(x), atol=1e-4)
    with pytest.raises(ValueError, match="not after"):
        avg.update_step(model, 4)
    with pytest.raises(ValueError, match="not after"):
        avg.update_epoch(model, 1)


@pytest.mark.parametrize("kind,decay,start,warmup,match", [
    ("none", 0.9, 1, 0, "none"), ("swa", 0.9, 1, 0, "unknown"), ("step_ema", 1.0, 1, 0, "decay"),
    ("epoch_ema", -0.1, 1, 0, "decay"), ("epoch_ema", 0.9, 0, 0, "start"),
    ("step_ema", 0.9, 1, -1, "warmup")])
def test_bad_arguments_raise_one_line(kind, decay, start, warmup, match):
    with pytest.raises(ValueError, match=match) as err:
        WeightAverage(torch.nn.Linear(2, 2), kind, decay, start=start, warmup_steps=warmup)
    assert "\n" not in str(err.value)


def test_from_config_defaults_and_checks():
    model = torch.nn.Linear(2, 2)
    base = {"kind": "none", "decay": None, "start": 1, "warmup": 0.025}
    assert averaging.from_config(model, base, epochs=10, steps_per_epoch=4) is None
    step = averaging.from_config(model, {**base, "kind": "step_ema"}, epochs=400,
                                 steps_per_epoch=98)
    assert step.decay == 0.995 and step.warmup_steps == pytest.approx(980.0)
    epoch = averaging.from_config(model, {**base, "kind": "epoch_ema", "decay": 0.8, "start": 3},
                                  epochs=10, steps_per_epoch=4)
    assert epoch.decay == 0.8 and epoch.start == 3 and not epoch.ready
    for key, value in (("kind", "ema"), ("decay", 1), ("start", 0), ("warmup", 2.0)):
        with pytest.raises(ValueError, match=f"avg.{key}"):
            averaging.check_config({**base, key: value})
