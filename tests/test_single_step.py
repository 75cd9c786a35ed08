"""Single-step inner attacks and GradAlign against literal implementations written from their
papers (docs/reference.md#single-step-attacks, #gradalign)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DIGITS
from torch import nn

from at.config import load_config
from at.grad_align import GradAlign
from at.methods import build_method
from at.schedules import attack_budget
from attacks import fgsm, frozen, maximise, n_fgsm

EPS = 8 / 255


def _net(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 6, 3, padding=1)]
    layers += [nn.BatchNorm2d(6)] if bn else []
    layers += [nn.Softplus(), nn.Flatten(), nn.Linear(6 * 8 * 8, 10)]
    return nn.Sequential(*layers).double()


def _batch(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)
    x[0, 0, :2] = 0.0  # pixels at the image-range edges, where clipping matters
    x[1, 1, :2] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


def _literal_fgsm_rs(model, x, y, eps, alpha):
    """Wong et al. 2020, Algorithm 3: delta ~ U(-eps, eps); delta += alpha sign(grad);
    delta = max(min(delta, eps), -eps); x + delta kept in the image range."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = torch.max(torch.min(delta, 1 - x), -x)
    delta.requires_grad_(True)
    F.cross_entropy(model(x + delta), y).backward()
    delta = delta.detach() + alpha * delta.grad.sign()
    delta = torch.max(torch.min(delta, torch.full_like(x, eps)), torch.full_like(x, -eps))
    return x + torch.max(torch.min(delta, 1 - x), -x)


def _literal_n_fgsm(model, x, y, eps, k, alpha):
    """de Jorge et al. 2022, Algorithm 1: eta ~ U(-k eps, k eps); x_aug = x + eta;
    delta = eta + alpha sign(grad at x_aug); no projection; x + delta clipped to [0, 1]."""
    eta = torch.empty_like(x).uniform_(-k * eps, k * eps)
    x_aug = (x + eta).requires_grad_(True)
    F.cross_entropy(model(x_aug), y).backward()
    delta = eta + alpha * x_aug.grad.sign()
    return torch.clamp(x + delta, 0.0, 1.0)


def _ce(model, y):
    return lambda z: F.cross_entropy(model(z), y, reduction="sum")


def test_fgsm_rs_matches_wong_et_al():
    model, (x, y) = _net(), _batch()
    torch.manual_seed(5)
    ours = fgsm(_ce(model, y), x, eps=EPS, step_size=1.25 * EPS, random_start=True)
    torch.manual_seed(5)
    literal = _literal_fgsm_rs(model, x, y, EPS, 1.25 * EPS)
    assert torch.allclose(ours, literal, atol=1e-12, rtol=0)
    assert (ours - x).abs().max() <= EPS + 1e-12 and ours.min() >= 0 and ours.max() <= 1


def test_n_fgsm_matches_de_jorge_et_al_and_leaves_the_eps_ball():
    model, (x, y) = _net(), _batch()
    torch.manual_seed(7)
    ours = n_fgsm(_ce(model, y), x, eps=EPS, step_size=EPS, k=2.0)
    torch.manual_seed(7)
    literal = _literal_n_fgsm(model, x, y, EPS, 2.0, EPS)
    assert torch.allclose(ours, literal, atol=1e-12, rtol=0)
    dist = (ours - x).abs()
    assert dist.max() > EPS * 1.5 and dist.max() <= 3 * EPS + 1e-12  # not projected; <= (k+1) eps
    assert ours.min() >= 0 and ours.max() <= 1


def test_plain_fgsm_is_one_step_of_eps_from_x():
    model, (x, y) = _net(), _batch()
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y).backward()
    expected = (x + EPS * xr.grad.sign()).clamp(0, 1)
    assert torch.equal(maximise(_ce(model, y), x, kind="fgsm", eps=EPS, step_size=EPS), expected)


def test_budget_gives_the_papers_steps():
    cfg = load_config(DIGITS, ["attack.schedule=fixed", "attack.eps_ramp=false"])
    a = cfg["attack"]
    for kind, factor in (("fgsm", 1.0), ("fgsm_rs", 1.25), ("n_fgsm", 1.0)):
        budget = attack_budget({**a, "kind": kind}, 1, 10)
        assert (budget.kind, budget.steps) == (kind, 1)
        assert budget.step_size == pytest.approx(factor * EPS) and budget.k == 2.0
    custom = attack_budget({**a, "kind": "n_fgsm", "step_factor": 0.5, "n_fgsm_k": 3.0}, 1, 10)
    assert custom.step_size == pytest.approx(0.5 * EPS) and custom.k == 3.0
    ramp = attack_budget({**a, "kind": "fgsm_rs", "eps_ramp": True}, 2, 4)
    assert ramp.eps == pytest.approx(EPS / 2) and ramp.step_size == pytest.approx(1.25 * EPS / 2)


METHOD_MODULES = {"pgd_at": "at.methods.pgd_at", "trades": "at.methods.trades",
                  "ikl_at": "at.methods.ikl_at", "lbgat": "at.methods.trades"}  # LBGAT: TRADES'


@pytest.mark.parametrize("name", sorted(METHOD_MODULES))
def test_every_method_runs_n_fgsm_on_its_own_objective(name, monkeypatch):
    """perturb with attack.kind=n_fgsm = a literal N-FGSM step (same noise) on the objective the
    method's attack climbs (captured from the method itself)."""
    import importlib
    cfg = {"name": name, "label_smoothing": 0.0, name: {}}
    method = build_method(cfg, 10).double()
    model, (x, y) = _net(bn=True), _batch()
    a = load_config(DIGITS, ["attack.schedule=fixed", "attack.eps_ramp=false",
                             "attack.kind=n_fgsm"])["attack"]
    budget = attack_budget(a, 1, 1)
    torch.manual_seed(3)
    ours = method.perturb(model, x, y, budget)

    seen = {}
    monkeypatch.setattr(importlib.import_module(METHOD_MODULES[name]), "maximise",
                        lambda objective, z, **kw: seen.setdefault("objective", objective) and z)
    method.perturb(model, x, y, budget)
    torch.manual_seed(3)
    eta = torch.empty_like(x).uniform_(-2 * EPS, 2 * EPS)
    with frozen(model):
        z = (x + eta).requires_grad_(True)
        (grad,) = torch.autograd.grad(seen["objective"](z).sum(), z)
    expected = (x + eta + EPS * grad.sign()).clamp(0, 1)
    assert torch.allclose(ours, expected, atol=1e-12, rtol=0)
    assert (ours - x).abs().max() > EPS


def _literal_grad_align(model, x, y, eps, lam):
    """Andriushchenko & Flammarion 2020, Eq. (6), as their code computes it: the gradient at x
    (a constant), the gradient at x + eta (double backpropagation), cosine per example."""
    eta = torch.empty_like(x).uniform_(-eps, eps)
    x1 = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(model(x1), y), x1)
    x2 = (x + eta).clamp(0, 1).requires_grad_(True)
    (g2,) = torch.autograd.grad(F.cross_entropy(model(x2), y), x2, create_graph=True)
    cos = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1)
    return lam * (1.0 - cos.mean())


def test_grad_align_term_and_gradient_match_a_literal_double_backprop():
    model, (x, y) = _net(bn=True), _batch()
    model.train()
    params = list(model.parameters())
    stats = [b.clone() for b in model.buffers()]
    torch.manual_seed(11)
    ours = GradAlign(0.2, EPS)(model, x, y)
    (g_ours,) = [torch.autograd.grad(ours, params)]
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers())), \
        "GradAlign moved the BatchNorm running statistics"
    torch.manual_seed(11)
    literal = _literal_grad_align(model, x, y, EPS, 0.2)
    g_literal = torch.autograd.grad(literal, params)
    assert ours.dtype == torch.float64 and 0 < ours.item()
    assert torch.allclose(ours, literal, rtol=1e-10, atol=0)
    for a, b in zip(g_ours, g_literal):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-14)
    assert any(g.abs().sum() > 0 for g in g_ours)  # the double backprop reaches the weights


def test_grad_align_leaves_out_examples_without_a_gradient():
    from at.grad_align import alignment_loss
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert alignment_loss(a, b).item() == pytest.approx((1.0 + 0.0) / 2)  # rows 0 and 2
    assert alignment_loss(torch.zeros(2, 3), torch.ones(2, 3)).item() == 0.0
