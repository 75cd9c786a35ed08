"""Distillation losses against their literal formulas in float64 (values and gradients), the
KD / DKD identities, and the Sinkhorn plan's marginals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from at.kd_losses import (
    dkd_loss,
    dkd_terms,
    ikl_kd_terms,
    kd_loss,
    sinkhorn_plan,
    wkd_logit_terms,
)

B, C = 6, 7


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(0)
    z_s = (2 * torch.randn(B, C, generator=g, dtype=torch.float64)).requires_grad_(True)
    z_t = 2 * torch.randn(B, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    return z_s, z_t, y


def _same(a, b, z_s):
    """Equal values and equal gradients with respect to the student logits."""
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a, b)
    (ga,) = torch.autograd.grad(a, z_s, retain_graph=True)
    (gb,) = torch.autograd.grad(b, z_s, retain_graph=True)
    assert torch.allclose(ga, gb, rtol=1e-9, atol=1e-12)


def test_kd_is_t_squared_kl(logits):
    z_s, z_t, _ = logits
    t = 4.0
    p_t = F.softmax(z_t / t, 1)
    naive = t ** 2 * sum((p_t[b] * (p_t[b].log() - F.log_softmax(z_s[b] / t, 0))).sum()
                         for b in range(B)) / B
    _same(kd_loss(z_s, z_t, t), naive, z_s)
    assert kd_loss(z_t.clone().requires_grad_(), z_t, t).abs() < 1e-12  # student = teacher


def test_dkd_terms_match_the_literal_formulas_and_decompose_kd(logits):
    z_s, z_t, y = logits
    t = 3.0
    terms = dkd_terms(z_s, z_t, y, t)
    p_s, p_t = F.softmax(z_s / t, 1), F.softmax(z_t / t, 1)
    for b in range(B):
        bs = torch.stack([p_s[b, y[b]], 1 - p_s[b, y[b]]])
        bt = torch.stack([p_t[b, y[b]], 1 - p_t[b, y[b]]])
        tckd = t * t * (bt * (bt.log() - bs.log())).sum()
        others = [c for c in range(C) if c != y[b]]
        qs = p_s[b, others] / p_s[b, others].sum()
        qt = p_t[b, others] / p_t[b, others].sum()
        nckd = t * t * (qt * (qt.log() - qs.log())).sum()
        _same(terms["tckd"][b], tckd, z_s)
        _same(terms["nckd"][b], nckd, z_s)
    # DKD paper eq. 4: KD = TCKD + (1 - p_t[y]) NCKD, per sample.
    per_sample_kd = t * t * (p_t * (p_t.log() - F.log_softmax(z_s / t, 1))).sum(1)
    weight = 1 - p_t.gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(per_sample_kd, terms["tckd"] + weight * terms["nckd"], rtol=1e-10)
    # Limiting cases: a uniform teacher has p_t[y] = 1/C for every sample, so DKD with
    # alpha = 1, beta = 1 - 1/C is KD; a student equal to its teacher has both terms 0.
    z_u = torch.zeros(B, C, dtype=torch.float64)
    assert torch.allclose(dkd_loss(z_s, z_u, y, alpha=1.0, beta=1 - 1 / C, temperature=t),
                          kd_loss(z_s, z_u, t), rtol=1e-10)
    equal = dkd_terms(z_t.clone(), z_t, y, t)
    assert equal["tckd"].abs().max() < 1e-12 and equal["nckd"].abs().max() < 1e-12


@pytest.mark.parametrize("version,gamma", [("v1", 1.0), ("v2", 0.3)])
def test_ikl_kd_matches_the_pairwise_formula(logits, version, gamma):
    z_s, z_t, _ = logits
    t = 4.0
    w = F.softmax(z_t / 100.0, 1)  # per-sample weights softmax(z_t / T2)
    terms = ikl_kd_terms(z_s, z_t, w, temperature=t, gamma=gamma, version=version)
    wg = w.pow(gamma)
    pair = wg[:, :, None] * wg[:, None, :]
    d_t = z_t[:, :, None] - z_t[:, None, :]
    d_s = z_s[:, :, None] - z_s[:, None, :]
    total = 0.25 * (pair * (d_t - d_s).pow(2)).sum()
    naive_wmse = total / (B if version == "v1" else pair.sum())
    naive_sce = -(F.softmax(z_t / t, 1) * F.log_softmax(z_s / t, 1)).sum() / B
    _same(terms["wmse"], naive_wmse, z_s)
    _same(terms["sce"], naive_sce, z_s)
    z_t_leaf = z_t.clone().requires_grad_(True)
    out = ikl_kd_terms(z_s, z_t_leaf, w, temperature=t, gamma=gamma, version=version)
    assert (out["wmse"] + out["sce"]).grad_fn is not None
    assert torch.autograd.grad(out["wmse"] + out["sce"], z_t_leaf, allow_unused=True)[0] is None


def test_sinkhorn_plan_has_the_two_distributions_as_marginals():
    g = torch.Generator().manual_seed(1)
    n = 9
    p_s = torch.rand(4, n, generator=g, dtype=torch.float64).softmax(1)
    p_t = torch.rand(4, n, generator=g, dtype=torch.float64).softmax(1)
    cost = torch.rand(n, n, generator=g, dtype=torch.float64)
    cost = (cost + cost.T) / 2
    plan = sinkhorn_plan(p_s, p_t, cost, reg=0.05, iterations=300)
    assert torch.allclose(plan.sum(2), p_s, atol=1e-6)  # rows: exact after the last u update
    assert torch.allclose(plan.sum(1), p_t, atol=1e-4)
    assert (plan >= 0).all()
    # The reference's 10 iterations: rows still exact, columns approximately.
    short = sinkhorn_plan(p_s, p_t, cost, reg=0.05, iterations=10)
    assert torch.allclose(short.sum(2), p_s, atol=1e-6)
    assert (short.sum(1) - p_t).abs().max() < 0.1


def test_wkd_logit_terms_match_the_literal_computation(logits):
    z_s, z_t, y = logits
    g = torch.Generator().manual_seed(2)
    cost = torch.rand(C, C, generator=g, dtype=torch.float64) + 1e-8
    t = 2.0
    out = wkd_logit_terms(z_s, z_t, y, cost, temperature=t, reg=0.05, iterations=10)
    p_t = F.softmax(z_t, 1)
    target = -sum(p_t[b, y[b]] * F.log_softmax(z_s[b], 0)[y[b]] for b in range(B)) / B
    wd = 0
    for b in range(B):
        others = [c for c in range(C) if c != y[b]]
        ps = F.softmax(z_s[b, others] / t, 0)
        pt = F.softmax(z_t[b, others] / t, 0)
        d = cost[others][:, others]
        k = torch.exp(-d / 0.05)
        u = torch.full((C - 1,), 1.0 / (C - 1), dtype=torch.float64)
        for _ in range(10):
            v = pt / (k.T @ u + 1e-8)
            u = ps / (k @ v + 1e-8)
        wd = wd + (u[:, None] * k * v[None, :] * d).sum()
    _same(out["target"], target, z_s)
    _same(out["wd"], wd / B, z_s)
