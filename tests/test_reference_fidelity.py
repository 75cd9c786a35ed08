"""The reference computations, written out literally as the reference repositories run them, and
compared in float64 with this project's: BatchNorm running statistics of TRADES (three forward
orders) and LBGAT, AWP's perturbation with two views, ghost BatchNorm against a DataParallel
emulation, the attack's train-mode BatchNorm and Wang et al.'s first-step BatchNorm momentum.
(The step EMA's 1-based decay is in tests/test_averaging.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from at.awp import AWP
from at.config import load_config
from at.methods.ikl_at import IKLAT
from at.methods.lbgat import LBGAT
from at.methods.trades import TRADES
from at.schedules import AttackBudget
from models import build_model
from models.bn import GhostBatchNorm2d, set_bn_groups

BUDGET = AttackBudget(eps=8 / 255, step_size=2 / 255, steps=2)


def _model(seed: int = 0, name: str = "wrn-16-1") -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10).double()


def _data(n: int = 8, seed: int = 1):
    """n random images (a few rows suffice: the comparisons are to rounding, in float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 10, (n,), generator=g)


def _sgd(*modules: nn.Module) -> torch.optim.SGD:
    params = [p for m in modules for p in m.parameters()]
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12, msg=name)


def _bn_gap(a: nn.Module, b: nn.Module) -> float:
    """Largest relative difference of the BatchNorm running variances."""
    return max(((u - v).abs().max() / v.abs().max()).item()
               for (k, u), v in zip(a.state_dict().items(), b.state_dict().values())
               if k.endswith("running_var"))


# ---- TRADES: the references' train-mode forwards ------------------------------------------------
def _reference_trades_loss(model, x, y, x_adv, beta, order):
    """The outer loss of each reference, forwards in their order."""
    model.train()
    if order == "clean,adv,clean":  # Zhang et al., trades.py trades_loss
        logits = model(x)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = (1.0 / len(x)) * F.kl_div(F.log_softmax(model(x_adv), dim=1),
                                                F.softmax(model(x), dim=1), reduction="sum")
    elif order == "adv,clean,clean":  # TRADES-AWP, train_trades_cifar.py
        logits_adv = model(x_adv)
        loss_robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(model(x), dim=1),
                               reduction="batchmean")
        logits = model(x)
        loss_natural = F.cross_entropy(logits, y)
    else:  # the DKL repository's train_trades_cifar.py
        logits_adv, logits_nat = model(x_adv), model(x)
        loss_robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1),
                               reduction="batchmean")
        loss_natural = F.cross_entropy(logits_nat, y)
    return loss_natural + beta * loss_robust


def _trades_runs(order: str, ours_order: str, steps: int):
    reference, ours = _model(), _model()
    method = TRADES(10, beta=6.0, forwards=ours_order)
    opt_ref, opt_ours = _sgd(reference), _sgd(ours)
    for step in range(steps):
        x, y = _data(seed=step)
        torch.manual_seed(step)
        x_adv = method.perturb(ours, x, y, BUDGET)
        for model, opt, loss_fn in (
                (reference, opt_ref, lambda: _reference_trades_loss(reference, x, y, x_adv, 6.0,
                                                                    order)),
                (ours, opt_ours, lambda: method.loss(ours, x, y, x_adv).total())):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
    return reference, ours


@pytest.mark.parametrize("order", ["clean,adv,clean", "adv,clean,clean", "adv,clean"])
@pytest.mark.parametrize("steps", [1, 3])
def test_trades_running_statistics_follow_each_reference(order, steps):
    reference, ours = _trades_runs(order, order, steps)
    _assert_same_state(reference, ours)  # weights and BatchNorm buffers, to rounding


def test_trades_forward_order_matters_for_the_statistics_only():
    """Two forwards instead of the reference's three: the same weights, other statistics."""
    reference, ours = _trades_runs("clean,adv,clean", "clean,adv", 1)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, dict(reference.named_parameters())[name],
                                   rtol=1e-10, atol=1e-12)
    assert _bn_gap(reference, ours) > 1e-3


def test_bad_forward_orders_are_one_line_errors():
    for spec in ("clean", "adv,adv", "clean,adversarial", ""):
        with pytest.raises(ValueError, match="method.trades.forwards"):
            TRADES(10, forwards=spec)
    with pytest.raises(ValueError, match="method.lbgat.forwards"):
        LBGAT(10, beta=6.0, natural_model="wrn-16-1", forwards="adv")


# ---- LBGAT ---------------------------------------------------------------------------------------
def _reference_lbgat_loss(model, teacher, x, y, x_adv, beta):
    """lbgat.py lbgat_loss after the attack."""
    model.train()
    out_adv = model(x_adv)
    out_natural = model(x)
    out = teacher(x)
    loss_mse = F.mse_loss(out_adv, out) + F.cross_entropy(out, y)
    loss_kl = (1.0 / out.size(0)) * F.kl_div(F.log_softmax(out_adv, dim=1),
                                             F.softmax(out_natural, dim=1), reduction="sum")
    return loss_mse + beta * loss_kl


@pytest.mark.parametrize("beta", [0.0, 6.0])
def test_lbgat_matches_the_reference_step_including_lbgat0_statistics(beta):
    torch.manual_seed(5)
    method = LBGAT(10, beta=beta, natural_model="wrn-16-1").double()
    reference, ours = _model(), _model()
    teacher = copy.deepcopy(method.natural)
    opt_ref, opt_ours = _sgd(reference, teacher), _sgd(ours, method)
    for step in range(3):
        x, y = _data(seed=step)
        torch.manual_seed(step)
        x_adv = method.perturb(ours, x, y, BUDGET)
        opt_ref.zero_grad()
        _reference_lbgat_loss(reference, teacher, x, y, x_adv, beta).backward()
        opt_ref.step()
        opt_ours.zero_grad()
        method.loss(ours, x, y, x_adv).total().backward()
        opt_ours.step()
    _assert_same_state(reference, ours)
    _assert_same_state(teacher, method.natural)


def test_lbgat0_without_the_clean_forward_has_no_clean_batch_in_its_statistics():
    torch.manual_seed(5)
    ref = LBGAT(10, beta=0.0, natural_model="wrn-16-1").double()
    skip = LBGAT(10, beta=0.0, natural_model="wrn-16-1", forwards="adv").double()
    a, b = _model(), _model()
    x, y = _data()
    x_adv = ref.perturb(a, x, y, BUDGET)
    ref.loss(a, x, y, x_adv)
    skip.loss(b, x, y, x_adv)
    assert _bn_gap(a, b) > 1e-3


# ---- AWP with two views --------------------------------------------------------------------------
def _reference_dkl_loss(logits_student, logits_teacher, alpha, beta, gamma, class_prior):
    """DKL v2's dkl_loss (utils_awp.py), temperature 1."""
    c = logits_teacher.size(1)
    delta_n = logits_teacher.view(-1, c, 1) - logits_teacher.view(-1, 1, c)
    delta_a = logits_student.view(-1, c, 1) - logits_student.view(-1, 1, c)
    with torch.no_grad():
        prior = torch.pow(class_prior, gamma)
        p_n = prior.view(-1, c, 1) @ prior.view(-1, 1, c)
    loss_mse = 0.25 * (torch.pow(delta_n - delta_a, 2) * p_n).sum() / p_n.sum()
    loss_sce = -(F.softmax(logits_teacher, dim=1).detach()
                 * F.log_softmax(logits_student, dim=-1)).sum(1).mean()
    return beta * loss_mse + alpha * loss_sce


def _reference_awp_diff(model, x, y, x_adv, prior_rows, alpha, beta, gamma):
    """TradesAWP.calc_awp of the DKL repository: a proxy copy, one SGD step on -loss over all
    rows, v = ||w|| / (||dw|| + 1e-20) dw for every 'weight' entry with ndim > 1."""
    proxy = copy.deepcopy(model)
    proxy.train()
    opt = torch.optim.SGD(proxy.parameters(), lr=0.1)
    logits_nat = proxy(x)
    logits_adv = proxy(x_adv)
    loss = -(F.cross_entropy(logits_nat, y)
             + _reference_dkl_loss(logits_adv, logits_nat, alpha, beta, gamma, prior_rows))
    opt.zero_grad()
    loss.backward()
    opt.step()
    old, new = model.state_dict(), proxy.state_dict()
    return {k: old[k].norm() / ((new[k] - old[k]).norm() + 1e-20) * (new[k] - old[k])
            for k in old if old[k].dim() > 1 and "weight" in k}


def _awp_added(method, model, x, y, x_adv):
    awp = AWP(model, gamma=5e-3, warmup=0)
    method.views = 2  # [basic; second view] batches, as build_method sets it
    awp.perturb(lambda: method.awp_loss(model, x, y, x_adv))
    names = [n for n, p in model.named_parameters() if p.ndim > 1 and "weight" in n]
    added = dict(zip(names, awp._added))
    awp.restore()
    return added


def test_awp_with_two_views_climbs_the_references_joint_loss():
    model = _model()
    x0, y0 = _data(8)
    x = torch.cat([x0, torch.flip(x0, dims=[3]).clamp(0, 1) * 0.9])  # [basic; second view]
    y = torch.cat([y0, y0])
    x_adv = (x + 0.02 * torch.randn_like(x)).clamp(0, 1)
    prior = torch.rand(10, 10, dtype=torch.float64) + 0.1
    prior /= prior.sum(1, keepdim=True)
    kwargs = dict(alpha=4.0, beta=20.0, version="v2", gamma=0.5, aug_weight=0.5)
    joint = IKLAT(10, **kwargs).double()
    joint.prior.copy_(prior)
    weighted = IKLAT(10, awp_views="weighted", **kwargs).double()
    weighted.prior.copy_(prior)
    want = _reference_awp_diff(model, x, y, x_adv, prior[y], 4.0, 20.0, 0.5)
    got = _awp_added(joint, model, x, y, x_adv)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], 5e-3 * want[name], rtol=1e-7, atol=1e-12)
    other = _awp_added(weighted, model, x, y, x_adv)
    gap = max(((other[k] - got[k]).norm() / got[k].norm()).item() for k in got)
    assert gap > 1e-3  # the per-view, aug-weighted loss is another direction


# ---- ghost BatchNorm = nn.DataParallel's statistics ----------------------------------------------
def test_ghost_batchnorm_layer_equals_split_and_normalise():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ghost = copy.deepcopy(bn)
    set_bn_groups(ghost, 4)
    assert isinstance(ghost, GhostBatchNorm2d)
    x = torch.randn(50, 5, 3, 3, dtype=torch.float64) * 2 + 1
    out = ghost.train()(x)
    blocks, want, m = x.chunk(4), [], bn.momentum
    for b in blocks:  # ceil(50 / 4) = 13, 13, 13, 11 rows
        mean = b.mean((0, 2, 3), keepdim=True)
        var = b.var((0, 2, 3), unbiased=False, keepdim=True)
        want.append((b - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1)
                    + bn.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(out, torch.cat(want))
    first = blocks[0]
    torch.testing.assert_close(ghost.running_mean, (1 - m) * torch.zeros(5, dtype=torch.float64)
                               + m * first.mean((0, 2, 3)))
    torch.testing.assert_close(ghost.running_var, (1 - m) + m * first.var((0, 2, 3)))
    assert ghost.num_batches_tracked.item() == 1
    ghost.eval()
    bn.load_state_dict(ghost.state_dict())  # the same keys; in eval mode the same layer
    torch.testing.assert_close(ghost(x), bn.eval()(x))


def test_ghost_batchnorm_network_equals_a_dataparallel_emulation():
    """k replicas of the network, each on its torch.chunk share, sharing parameters; replica 0
    updates the module's buffers, the others copies: logits, gradients and buffers agree."""
    k = 4
    model = _model()
    ghost = copy.deepcopy(model)
    assert set_bn_groups(ghost, k) > 0
    x, y = _data(30)
    params = dict(model.named_parameters())
    outs = [model(x.chunk(k)[0])]
    for block in x.chunk(k)[1:]:
        copies = {n: b.clone() for n, b in model.named_buffers()}
        outs.append(functional_call(model, {**params, **copies}, (block,)))
    logits = torch.cat(outs)
    F.cross_entropy(logits, y).backward()
    ghost_logits = ghost(x)
    F.cross_entropy(ghost_logits, y).backward()
    torch.testing.assert_close(ghost_logits, logits, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), ghost.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    _assert_same_state(model, ghost)


# ---- the attack with train-mode BatchNorm (Wang et al.) -----------------------------------------
def test_train_mode_attack_uses_batch_statistics_and_leaves_buffers_alone():
    model = _model()
    reference = copy.deepcopy(model)
    x, y = _data()
    before = copy.deepcopy(model.state_dict())
    budget = AttackBudget(eps=8 / 255, step_size=2 / 255, steps=3, init="uniform", bn="train")
    torch.manual_seed(7)
    x_adv = TRADES(10).perturb(model, x, y, budget)
    torch.manual_seed(7)
    torch.randn(x.shape, dtype=x.dtype)  # random_start draws its normal noise first
    start = (x + (2 * torch.rand(x.shape, dtype=x.dtype) - 1) * 8 / 255).clamp(0, 1)
    # Wang et al., trades.py: model.train(), running statistics off, p_natural once, KL(sum).
    reference.train()
    for m in reference.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    p_natural = F.softmax(reference(x), dim=1).detach()
    want = start  # x + U(-eps, eps), clamped, as Wang et al. start
    for _ in range(3):
        want.requires_grad_()
        loss = F.kl_div(F.log_softmax(reference(want), dim=1), p_natural, reduction="sum")
        grad = torch.autograd.grad(loss, [want])[0]
        want = want.detach() + 2 / 255 * torch.sign(grad)
        want = torch.min(torch.max(want, x - 8 / 255), x + 8 / 255).clamp(0, 1)
    torch.testing.assert_close(x_adv, want, rtol=0, atol=1e-12)
    for k, v in model.state_dict().items():  # buffers (num_batches_tracked too) untouched
        assert torch.equal(v, before[k]), k
    assert model.training and all(m.track_running_stats for m in model.modules()
                                  if isinstance(m, nn.modules.batchnorm._BatchNorm))
    torch.manual_seed(7)
    eval_adv = TRADES(10).perturb(model, x, y, AttackBudget(eps=8 / 255, step_size=2 / 255,
                                                            steps=3, init="uniform"))
    assert not torch.allclose(eval_adv, x_adv)


# ---- Wang et al.'s BatchNorm momentum of the first step -----------------------------------------
@pytest.mark.slow
def test_first_step_bn_momentum_follows_wang_et_al(tmp_path):
    """watrain.py: momentum 1.0 at global step 0, then 0.01. One full-batch step per epoch of
    plain training, so the batch (as a set) and the update are known exactly."""
    from conftest import DIGITS

    from at.trainer import Trainer
    from data import Splits
    cfg = load_config(DIGITS, [f"out_dir={tmp_path / 'run'}", "device=cpu", "log.plot=false",
                               "method.name=standard", "model.name=wrn-16-1-swish",
                               "model.bn_momentum=0.01", "model.bn_first_momentum=1.0",
                               "data.augment=none", "optim.batch_size=32", "optim.epochs=3",
                               "speed.channels_last=false", "speed.fused_optimizer=false",
                               "optim.weight_decay=0", "optim.momentum=0"])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,), generator=g)
    splits = Splits(images, labels, images[:0], labels[:0], images[:8], labels[:8], 10, "digits")
    trainer = Trainer(cfg, splits=splits)
    reference = copy.deepcopy(trainer.model)
    opt = torch.optim.SGD(reference.parameters(), lr=cfg["optim"]["lr"])
    x = images.float() / 255
    for global_step in range(3):
        trainer.epoch += 1
        trainer.train_epoch()
        lr = trainer.optimizer.param_groups[0]["lr"]
        for group in opt.param_groups:
            group["lr"] = lr
        for m in reference.modules():  # watrain.py's set_bn_momentum
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and global_step < 2:
                m.momentum = 1.0 if global_step == 0 else 0.01
        reference.train()
        opt.zero_grad()
        F.cross_entropy(reference(x), labels).backward()
        opt.step()
        for (name, a), b in zip(reference.state_dict().items(),
                                trainer.model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert all(m.momentum == 0.01 for m in trainer.model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
