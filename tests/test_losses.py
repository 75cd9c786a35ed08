"""Loss identities: closed-form wMSE == naive pairwise sum; DKL gradients == TRADES KL gradients."""
import pytest
import torch
import torch.nn.functional as F

from at.losses import dkl_loss, ikl_loss, ikl_terms, pair_weighted_mse, soft_ce, trades_kl


def _logits(b=6, c=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    adv = (scale * torch.randn(b, c, generator=g, dtype=torch.float64)).requires_grad_()
    clean = (scale * torch.randn(b, c, generator=g, dtype=torch.float64)).requires_grad_()
    return adv, clean


def _prior_weights(y, c, seed=1):
    g = torch.Generator().manual_seed(seed)
    prior = torch.rand(c, c, generator=g, dtype=torch.float64) ** 3
    return (prior / prior.sum(1, keepdim=True))[y]


def naive_ikl(adv, clean, w, alpha, beta, gamma, version):
    """The reference's B x C x C construction, written out literally
    (docs/reference.md#wmse-in-obc)."""
    if version == "v2":
        w = w ** gamma
    pair_w = w[:, :, None] * w[:, None, :]
    dn = clean[:, :, None] - clean[:, None, :]
    da = adv[:, :, None] - adv[:, None, :]
    total = 0.25 * (pair_w * (dn - da) ** 2).sum()
    wmse = total / adv.shape[0] if version == "v1" else total / pair_w.sum()
    sce = -(F.softmax(clean.detach(), 1) * F.log_softmax(adv, 1)).sum(1).mean()
    return beta * wmse + alpha * sce


@pytest.mark.parametrize("version,gamma", [("v1", 1.0), ("v2", 1.0), ("v2", 0.3), ("v2", 2.0)])
def test_ikl_closed_form_equals_pairwise_values_and_gradients(version, gamma):
    adv, clean = _logits(b=8, c=10)
    y = torch.arange(8) % 10
    w = _prior_weights(y, 10)
    ours = ikl_loss(adv, clean, w, alpha=3.0, beta=20.0, gamma=gamma, version=version)
    ref = naive_ikl(adv, clean, w, 3.0, 20.0, gamma, version)
    g_ours = torch.autograd.grad(ours, (adv, clean))
    g_ref = torch.autograd.grad(ref, (adv, clean))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # wMSE has no stop-gradient: both branches receive its gradient.
    wmse = ikl_terms(adv, clean, w, gamma=gamma, version=version)["wmse"]
    ga, gc = torch.autograd.grad(wmse, (adv, clean))
    assert ga.abs().sum() > 0 and gc.abs().sum() > 0


def test_ikl_v1_equals_v2_when_gamma_is_one():
    adv, clean = _logits()
    w = _prior_weights(torch.tensor([0, 1, 2, 3, 4, 5]), 7)
    torch.testing.assert_close(ikl_loss(adv, clean, w, version="v1"),
                               ikl_loss(adv, clean, w, version="v2"))


def test_ikl_beta_zero_is_soft_ce_and_v1_rejects_gamma():
    adv, clean = _logits()
    w = _prior_weights(torch.zeros(6, dtype=torch.long), 7)
    torch.testing.assert_close(ikl_loss(adv, clean, w, alpha=2.5, beta=0.0),
                               2.5 * soft_ce(adv, clean))
    with pytest.raises(ValueError, match="v2"):
        ikl_loss(adv, clean, w, gamma=0.5, version="v1")
    with pytest.raises(ValueError, match="version"):
        ikl_loss(adv, clean, w, version="v3")


def test_soft_ce_gradient_reaches_only_the_adversarial_logits():
    adv, clean = _logits()
    loss = soft_ce(adv, clean)
    assert loss.grad_fn is not None
    ga, = torch.autograd.grad(loss, adv, retain_graph=True)
    assert torch.autograd.grad(loss, clean, allow_unused=True)[0] is None
    torch.testing.assert_close(ga, (F.softmax(adv, 1) - F.softmax(clean, 1)).detach() / 6)


def test_wmse_is_shift_invariant_and_stable_for_large_logits():
    adv, clean = _logits(scale=1.0)
    w = _prior_weights(torch.arange(6), 7)
    base = pair_weighted_mse(clean, adv, w)
    shifted = pair_weighted_mse(clean + 1e6, adv - 3e5, w)  # constants cancel in differences
    torch.testing.assert_close(base, shifted, rtol=1e-6, atol=1e-6)
    f32 = pair_weighted_mse(clean.float() + 1e4, adv.float(), w.float())
    torch.testing.assert_close(f32.double(), pair_weighted_mse(clean + 1e4, adv, w), rtol=1e-4,
                               atol=1e-2)


def test_trades_kl_is_zero_on_equal_logits_and_positive_otherwise():
    adv, clean = _logits()
    assert trades_kl(clean, clean).abs().item() < 1e-12
    assert trades_kl(adv, clean).item() > 0
    expected = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
    torch.testing.assert_close(trades_kl(adv, clean), expected)


def test_dkl_gradients_equal_trades_kl_gradients():
    """The paper's Theorem 1: with alpha = beta = 1, DKL and KL have the same gradients."""
    for seed in range(3):
        adv, clean = _logits(b=5, c=12, seed=seed)
        g_kl = torch.autograd.grad(trades_kl(adv, clean), (adv, clean))
        g_dkl = torch.autograd.grad(dkl_loss(adv, clean), (adv, clean))
        for a, b in zip(g_kl, g_dkl):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _grad_or_zero(loss, tensor):
    (g,) = torch.autograd.grad(loss, tensor, retain_graph=True, allow_unused=True)
    return torch.zeros_like(tensor) if g is None else g


def test_dkl_terms_feed_separate_branches():
    adv, clean = _logits()
    only_wmse = dkl_loss(adv, clean, alpha=0.0, beta=1.0)
    assert _grad_or_zero(only_wmse, adv).abs().max() == 0
    assert _grad_or_zero(only_wmse, clean).abs().max() > 0
    only_sce = dkl_loss(adv, clean, alpha=1.0, beta=0.0)
    assert _grad_or_zero(only_sce, clean).abs().max() == 0
    assert _grad_or_zero(only_sce, adv).abs().max() > 0
