"""The throughput settings (at/speed.py): the defaults compute what the straightforward step
computes, the opt-in bf16 paths stay close to float32, and a training step reads nothing back
from the device between log intervals."""
from __future__ import annotations

import pytest
import torch
from conftest import DIGITS

from at.config import load_config
from at.schedules import attack_budget
from at.trainer import Trainer
from errors import ConfigError

STRAIGHTFORWARD = ["speed.channels_last=false", "speed.fused_optimizer=false"]


def _trainer(tmp_path, name: str, *overrides: str) -> Trainer:
    cfg = load_config(DIGITS, [f"out_dir={tmp_path / name}", "device=cpu", "log.plot=false",
                               "optim.batch_size=32", "attack.schedule=fixed", "attack.steps=3",
                               "attack.step_size=2/255", "awp.enabled=true", "awp.warmup=0",
                               "method.ikl_at.attack_beta=1.0", *overrides])
    return Trainer(cfg)


def _batch(trainer: Trainer, n: int = 32, dtype=torch.float32):
    x = trainer.splits.train_x[:n].to(dtype) / 255
    return x, trainer.splits.train_y[:n]


def _steps(trainer: Trainer, x, y, steps: int = 3) -> list[torch.Tensor]:
    """`steps` training steps through the trainer's own step code on a fixed batch."""
    budget = attack_budget(trainer.cfg["attack"], 1, trainer.cfg["optim"]["epochs"])
    trainer.loader.global_size = len(y)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)  # the same attack starts in both runs
        _, loss = trainer._forward_backward(x, y, budget, trainer.awp)
        trainer.optimizer.step()
        trainer.awp.restore()
        losses.append(loss.detach())
    return losses


@pytest.mark.slow
def test_default_speed_settings_train_exactly_like_the_straightforward_step(tmp_path):
    """channels_last + fused SGD vs NCHW + a loop over tensors, in float64: attack, AWP,
    outer loss and update of three IKL-AT steps agree to rounding (1e-9 of the weights' motion)."""
    runs = {}
    for name, overrides in (("fast", []), ("plain", STRAIGHTFORWARD)):
        t = _trainer(tmp_path, name, *overrides)
        assert (t.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
                == (name == "fast"))
        start = [p.detach().clone() for p in t.model.parameters()]
        t.model.double()
        t.method.double()
        x, y = _batch(t, 16, dtype=torch.float64)  # a few rows: the comparison is to rounding
        losses = _steps(t, x, y)
        moved = [p.detach() - s.double() for p, s in zip(t.model.parameters(), start)]
        runs[name] = (losses, moved)
    (fast_losses, fast_moved), (plain_losses, plain_moved) = runs["fast"], runs["plain"]
    assert torch.allclose(torch.stack(fast_losses), torch.stack(plain_losses), rtol=1e-10)
    motion = torch.cat([m.flatten() for m in plain_moved]).norm()
    gap = torch.cat([(a - b).flatten() for a, b in zip(fast_moved, plain_moved)]).norm()
    assert motion > 1e-3 and gap <= 1e-9 * motion, (float(gap), float(motion))


@pytest.mark.slow
def test_bf16_autocast_stays_close_to_float32(tmp_path):
    """Opt-in bf16 for the attack and the update: float32 logits, a valid perturbation, and
    the first step's loss within a few percent of float32's."""
    losses, grads = {}, {}
    for name, overrides in (("fp32", []), ("bf16", ["speed.attack_precision=bfloat16",
                                                    "speed.update_precision=bfloat16"])):
        t = _trainer(tmp_path, name, *overrides)
        x, y = _batch(t)
        budget = attack_budget(t.cfg["attack"], 1, t.cfg["optim"]["epochs"])
        t.loader.global_size = len(y)
        torch.manual_seed(0)
        out, loss = t._forward_backward(x, y, budget, None, 1)
        assert out.logits_adv.dtype == out.logits_clean.dtype == torch.float32
        losses[name] = float(loss.detach())
        grads[name] = torch.cat([p.grad.flatten() for p in t.model.parameters()])
        if name == "bf16":
            torch.manual_seed(0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x_adv = t.method.perturb(t.model, x, y, budget)
            assert x_adv.dtype == torch.float32
            assert (x_adv - x).abs().max() <= budget.eps + 1e-6
            assert 0 <= x_adv.min() and x_adv.max() <= 1
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cosine > 0.95, float(cosine)


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="speed.attack_precision must be one of float32, bfloat"):
        _trainer(tmp_path, "bad", "speed.attack_precision=fp16")


_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")


def _count_host_reads(monkeypatch) -> list[str]:
    """Record every Python-level read of a tensor's value into host memory."""
    calls: list[str] = []
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, __original=original, __name=name, **kwargs):
            calls.append(__name)
            return __original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.slow
def test_training_steps_read_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Metrics stay on the device until the log interval: an epoch of 8 steps reads the device
    exactly as often as an epoch of 2 (on a GPU each read would stall the pipeline)."""
    reads = {}
    for steps in (2, 8):
        t = _trainer(tmp_path, f"s{steps}", "optim.batch_size=16", "attack.steps=1",
                     "log.interval=1000", "checkpoint.every_minutes=0")
        keep = 16 * steps
        t.loader.x, t.loader.y = t.loader.x[:keep], t.loader.y[:keep]
        assert len(t.loader) == steps
        t.epoch = 1
        calls = _count_host_reads(monkeypatch)
        t.train_epoch()
        monkeypatch.undo()
        reads[steps] = list(calls)
    assert reads[2] == reads[8], reads


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_steps_never_synchronise(tmp_path):
    t = _trainer(tmp_path, "cuda", "device=cuda", "optim.batch_size=16", "log.interval=1000",
                 "checkpoint.every_minutes=0")
    budget = attack_budget(t.cfg["attack"], 1, t.cfg["optim"]["epochs"])
    batches = iter(t.loader)
    next(batches)  # the epoch's plan is uploaded before the first batch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            x, y = next(batches)
            _, loss = t._forward_backward(x, y, budget, t.awp, 1)
            t.optimizer.step()
            t.awp.restore()
            t.method.observe(y, _)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_fused_update_after_loading_a_checkpoint_of_the_other_layout():
    """Momentum buffers saved from NCHW parameters, loaded for channels_last ones: the fused
    update must equal the loop over tensors (it reads both as flat memory)."""
    from at.optim import match_state_layout
    torch.manual_seed(0)
    nchw = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    nhwc = torch.nn.Parameter(nchw.detach().clone().contiguous(memory_format=torch.channels_last))
    loop = torch.optim.SGD([nchw], lr=0.1, momentum=0.9, foreach=False)
    fused = torch.optim.SGD([nhwc], lr=0.1, momentum=0.9, fused=True)
    grads = [torch.randn(4, 3, 3, 3) for _ in range(2)]
    nchw.grad = grads[0].clone()
    loop.step()
    fused.load_state_dict(loop.state_dict())
    with torch.no_grad():
        nhwc.copy_(nchw)
    match_state_layout(fused)
    for p, opt in ((nchw, loop), (nhwc, fused)):
        p.grad = grads[1].clone().contiguous(memory_format=torch.channels_last) \
            if p is nhwc else grads[1].clone()
        opt.step()
    assert torch.allclose(nchw, nhwc, atol=1e-6)
