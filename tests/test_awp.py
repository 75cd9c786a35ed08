"""Adversarial weight perturbation: the proxy-free form equals the reference's proxy-model
procedure, the training step it wraps is the optimizer's step taken at the perturbed point, and
the perturbation leaves nothing behind (BN statistics, .grad, modes, non-conv/linear params)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from at.awp import AWP
from at.methods import build_method
from at.schedules import AttackBudget
from models import build_model

BUDGET = AttackBudget(eps=8 / 255, step_size=2 / 255, steps=2)


def _setup(name="ikl_at", dtype=torch.float32, seed=0, n=8):
    """A random wrn-16-1, a method with a non-uniform IKL prior, a batch and its PGD examples."""
    torch.manual_seed(seed)
    model = build_model("wrn-16-1", 10).to(dtype)
    method = build_method({"name": name, name: {}}, 10).to(dtype)
    if name == "ikl_at":
        method.prior.copy_(torch.randn(10, 10, dtype=dtype).softmax(1))
    x, y = _batch(n, dtype, seed)
    model.train()
    return model, method, x, y, method.perturb(model, x, y, BUDGET)


def _batch(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 32, 32, generator=g, dtype=dtype),
            torch.randint(0, 10, (n,), generator=g))


def _params(model):
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _buffers(model):
    return {k: b.clone() for k, b in model.named_buffers()}


def _is_awp_weight(name, p):
    return p.ndim > 1 and "weight" in name


def reference_v(model, loss_of, lr):
    """The reference (csdongxian/AWP `calc_awp`, DKL utils_awp): a proxy copy of the model takes
    one plain-SGD step on -loss; v_l = ||w_l|| / (||dw_l|| + 1e-20) * dw_l, dw = proxy - model,
    for state-dict entries with ndim > 1 and 'weight' in the name."""
    proxy = copy.deepcopy(model)
    proxy.train()
    opt = torch.optim.SGD(proxy.parameters(), lr=lr)
    opt.zero_grad()
    (-loss_of(proxy)).backward()
    opt.step()
    v = {}
    for (k, w), (kp, wp) in zip(model.state_dict().items(), proxy.state_dict().items()):
        assert k == kp
        if w.ndim > 1 and "weight" in k:
            dw = wp - w
            v[k] = w.norm() / (dw.norm() + 1e-20) * dw
    return v


@pytest.mark.parametrize("name,lr", [("ikl_at", 0.37), ("trades", 0.02)])
def test_equals_the_proxy_model_reference(name, lr):
    model, method, x, y, x_adv = _setup(name, torch.float64)
    gamma = 5e-3
    v_ref = reference_v(model, lambda m: method.loss(m, x, y, x_adv).total(), lr)
    before = _params(model)
    AWP(model, gamma=gamma).perturb(lambda: method.loss(model, x, y, x_adv).total())
    after = _params(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == set(v_ref) and len(moved) == 16  # wrn-16-1: 15 convs (2 shortcuts) + fc
    for k in v_ref:
        torch.testing.assert_close(after[k] - before[k], gamma * v_ref[k], rtol=1e-9, atol=1e-15)
        # the layer moves by gamma * ||w_l|| (relative size gamma)
        assert (after[k] - before[k]).norm().item() == pytest.approx(
            gamma * before[k].norm().item(), rel=1e-9)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.dead = nn.Linear(4, 2)    # reached with a factor 0: gradient exactly 0
        self.unused = nn.Linear(4, 2)  # not in the graph at all: no gradient
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.bn(self.conv(x)).mean((2, 3))
        return self.fc(h) + 0 * self.dead(h)


def test_layers_without_gradient_stay_put_like_in_the_reference():
    torch.manual_seed(0)
    model = _Toy().double()
    x, y = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    loss_of = lambda m: F.cross_entropy(m(x), y)
    v_ref = reference_v(model, loss_of, lr=0.1)
    before = _params(model)
    AWP(model).perturb(lambda: loss_of(model))
    after = _params(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    for k in ("dead.weight", "unused.weight"):
        assert torch.equal(after[k], before[k]) and not v_ref[k].any()
    for k in ("conv.weight", "fc.weight"):
        torch.testing.assert_close(after[k] - before[k], 5e-3 * v_ref[k], rtol=1e-9, atol=1e-15)
        assert not torch.equal(after[k], before[k])


def test_step_is_the_optimizer_step_at_the_perturbed_point_and_restore_removes_it():
    """perturb -> loss/backward/step -> restore == (w + gamma v) -> same step -> - gamma v,
    over two steps so that momentum and weight decay both act on the perturbed point."""
    model, method, _, _, _ = _setup("ikl_at")
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt, opt_twin, opt_plain = sgd(model), sgd(twin), sgd(plain)
    awp = AWP(model)

    def step(m, o, x, y, x_adv):
        loss = method.loss(m, x, y, x_adv).total()
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()

    for it in range(2):
        x, y = _batch(8, torch.float32, seed=10 + it)
        x_adv = method.perturb(model, x, y, BUDGET)
        w0 = _params(model)
        awp.perturb(lambda: method.loss(model, x, y, x_adv).total())
        added = {k: p.detach() - w0[k] for k, p in model.named_parameters()}
        step(model, opt, x, y, x_adv)
        awp.restore()

        with torch.no_grad():  # by hand: start from w + gamma v, same step, subtract gamma v
            for k, p in twin.named_parameters():
                p += added[k]
        step(twin, opt_twin, x, y, x_adv)
        with torch.no_grad():
            for k, p in twin.named_parameters():
                p -= added[k]
        step(plain, opt_plain, x, y, x_adv)

        for k, p in model.named_parameters():
            torch.testing.assert_close(p, dict(twin.named_parameters())[k], rtol=1e-5, atol=1e-6)
        # The extra AWP forward left no trace in BN: running stats updated once per step.
        for k, b in model.named_buffers():
            torch.testing.assert_close(b, dict(twin.named_buffers())[k], rtol=1e-5, atol=1e-6)
    # ... and the perturbation did change the training trajectory.
    diff = max((p - q).abs().max().item()
               for p, q in zip(model.parameters(), plain.parameters()))
    assert diff > 1e-4


def test_perturb_then_restore_returns_the_weights_to_within_rounding():
    model, method, x, y, x_adv = _setup("trades")
    awp = AWP(model, gamma=5e-3)
    w0 = _params(model)
    awp.perturb(lambda: method.loss(model, x, y, x_adv).total())
    delta = {k: p.detach() - w0[k] for k, p in model.named_parameters()}
    awp.restore()
    ulp = torch.finfo(torch.float32).eps
    for k, p in model.named_parameters():
        # (w + d) - d in floating point: at most one rounding of each operation
        assert ((p - w0[k]).abs() <= ulp * (w0[k].abs() + delta[k].abs())).all(), k
        if not _is_awp_weight(k, p):
            assert torch.equal(p, w0[k]), k


@pytest.mark.parametrize("name", ["ikl_at", "trades"])
def test_increases_the_loss_and_leaves_bn_stats_grads_and_modes_alone(name):
    model, method, x, y, x_adv = _setup(name)
    loss_fn = lambda: method.loss(model, x, y, x_adv).total()
    with torch.no_grad():
        loss0 = loss_fn().item()
    params = list(model.parameters())
    for p in params[::2]:  # half the params carry a gradient from an earlier pass, half None
        p.grad = torch.randn_like(p)
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    buffers = _buffers(model)
    assert any(k.endswith("num_batches_tracked") for k in buffers)
    model.eval()
    AWP(model).perturb(loss_fn)
    assert not model.training and not any(m.training for m in model.modules())
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    for p, g in zip(params, grads):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    with torch.no_grad():
        loss1 = loss_fn().item()
    assert loss1 > loss0


def test_moves_only_conv_and_linear_weights():
    model, method, x, y, x_adv = _setup("ikl_at")
    before = _params(model)
    AWP(model).perturb(lambda: method.loss(model, x, y, x_adv).total())
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]) != _is_awp_weight(k, p), k
    kinds = {k.rsplit(".", 2)[-2][:2] for k, p in model.named_parameters()
             if _is_awp_weight(k, p)}
    assert kinds == {"co", "fc"}  # conv*, convShortcut, fc; no bn*


def test_warmup_and_call_order():
    model, method, x, y, x_adv = _setup("trades", n=4)
    awp = AWP(model, gamma=5e-3, warmup=10)
    assert [awp.active(e) for e in (1, 9, 10, 11, 200)] == [False, False, True, True, True]
    assert AWP(model, warmup=0).active(1) and not AWP(model, gamma=0.0, warmup=0).active(5)
    with pytest.raises(ValueError):
        AWP(model, gamma=-1.0)
    with pytest.raises(RuntimeError):
        awp.restore()
    loss_fn = lambda: method.loss(model, x, y, x_adv).total()
    awp.perturb(loss_fn)
    with pytest.raises(RuntimeError):
        awp.perturb(loss_fn)
    awp.restore()
    with pytest.raises(RuntimeError):
        awp.restore()
    awp.perturb(loss_fn)  # usable again after a restore
    awp.restore()


def test_protected_modules_keep_their_bn_statistics():
    """A method's own network that the loss runs (LBGAT's natural model) is not perturbed and
    keeps its running statistics when passed as `protect`."""
    torch.manual_seed(0)
    model, natural = _Toy(), _Toy()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 1, 0])
    loss_fn = lambda: F.mse_loss(model(x), natural(x)) + F.cross_entropy(natural(x), y)
    params, buffers = _params(natural), _buffers(natural)
    AWP(model, protect=[natural]).perturb(loss_fn)
    for k, b in natural.named_buffers():
        assert torch.equal(b, buffers[k]), k
    for k, p in natural.named_parameters():
        assert torch.equal(p, params[k]), k
    AWP(model).perturb(loss_fn)  # unprotected: the extra forward would have left a trace
    assert natural.bn.num_batches_tracked.item() == buffers["bn.num_batches_tracked"].item() + 2
