"""Every method takes a real training step; IKL-AT's class prior is the class-conditional mean."""
import pytest
import torch
import torch.nn.functional as F

from at.config import load_config
from at.methods import METHODS, StepOutput, build_method
from at.methods.ikl_at import IKLAT
from at.optim import build_optimizer
from at.schedules import AttackBudget
from models import build_model

BUDGET = AttackBudget(eps=8 / 255, step_size=2 / 255, steps=3)
EXPECTED_TERMS = {"standard": {"ce"}, "pgd_at": {"ce_adv"}, "trades": {"ce", "kl"},
                  "ikl_at": {"ce", "wmse", "sce"}, "lbgat": {"mse", "ce_natural"}}


def _batch(n=16, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, c, (n,), generator=g)


def test_registry_is_complete_and_unknown_names_fail():
    # distill needs a trained teacher: tests/test_distill.py covers it.
    assert set(METHODS) == set(EXPECTED_TERMS) | {"distill"}
    # base.yaml holds one parameter section per method: at load, those sections name the methods.
    sections = {k for k, v in load_config(None)["method"].items() if isinstance(v, dict)}
    assert sections == set(METHODS)
    with pytest.raises(ValueError) as err:
        build_method({"name": "ikl"}, 10)
    assert "ikl_at" in str(err.value) and "trades" in str(err.value)


@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_one_training_step(name):
    torch.manual_seed(0)
    model = build_model("wrn-16-1", 10)
    method = build_method({"name": name, name: {"natural_model": "wrn-16-1"}
                           if name == "lbgat" else {}}, 10)
    optimizer = build_optimizer({"weight_decay": 5e-4, "no_decay_bn": True, "lr": 0.1,
                                 "momentum": 0.9, "nesterov": False}, [model, method])
    x, y = _batch()
    model.train()
    x_adv = method.perturb(model, x, y, BUDGET)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert (x_adv - x).abs().max() <= BUDGET.eps + 1e-6
    assert (x_adv - x).abs().max() > 0 if method.uses_attack else torch.equal(x_adv, x)
    before = [p.detach().clone() for p in model.parameters()]
    out = method.loss(model, x, y, x_adv)
    assert isinstance(out, StepOutput) and set(out.terms) == EXPECTED_TERMS[name]
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.terms.values())
    optimizer.zero_grad()
    out.total().backward()
    optimizer.step()
    method.observe(y, out)
    method.on_epoch_end()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ikl_prior_is_the_class_conditional_mean_of_tempered_softmax():
    method = IKLAT(4, temperature=2.0)
    torch.testing.assert_close(method.prior, torch.full((4, 4), 0.25))
    g = torch.Generator().manual_seed(0)
    ys, logits = [], []
    for _ in range(3):  # three steps of one epoch; class 3 never appears
        y = torch.randint(0, 3, (10,), generator=g)
        z = 4 * torch.randn(10, 4, generator=g)
        method.observe(y, StepOutput({}, logits_clean=z))
        ys.append(y), logits.append(z)
    method.on_epoch_end()
    y, z = torch.cat(ys), torch.cat(logits)
    for c in range(3):
        expected = F.softmax(z[y == c] / 2.0, dim=1).mean(0)
        torch.testing.assert_close(method.prior[c], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(method.prior[3], torch.full((4,), 0.25))  # absent class: kept
    torch.testing.assert_close(method.prior.sum(1), torch.ones(4))
    assert method.prior_sum.abs().sum() == 0  # reset for the next epoch
    # The prior travels with the method's state_dict (and so with the checkpoint).
    fresh = IKLAT(4, temperature=2.0)
    fresh.load_state_dict(method.state_dict())
    torch.testing.assert_close(fresh.prior, method.prior)


def test_ikl_prior_momentum_mixes_with_the_previous_prior():
    method = IKLAT(3, prior_momentum=0.25)
    method.observe(torch.tensor([0, 1, 2]), StepOutput({}, logits_clean=torch.eye(3) * 50))
    method.on_epoch_end()
    expected = 0.25 * torch.eye(3) + 0.75 * torch.full((3, 3), 1 / 3)
    torch.testing.assert_close(method.prior, expected, rtol=1e-5, atol=1e-6)


def test_ikl_loss_uses_the_prior_of_each_label():
    torch.manual_seed(0)
    model = build_model("wrn-16-1", 5).train()
    method = IKLAT(5, alpha=2.0, beta=7.0)
    method.prior.copy_(torch.softmax(torch.randn(5, 5), 1))
    x, y = _batch(8, 5)
    x_adv = (x + 0.01).clamp(0, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = method.loss(model, x, y, x_adv)
    model.load_state_dict(state)
    logits_adv, logits_clean = model(x_adv), model(x)
    from at.losses import ikl_terms
    ref = ikl_terms(logits_adv, logits_clean, method.prior[y])
    torch.testing.assert_close(out.terms["wmse"], 7.0 * ref["wmse"])
    torch.testing.assert_close(out.terms["sce"], 2.0 * ref["sce"])
    torch.testing.assert_close(out.terms["ce"], F.cross_entropy(logits_clean, y))


def test_ikl_attack_objective_follows_the_dataset_setting():
    """CIFAR-10 (attack_beta 0) maximises SCE only; CIFAR-100 (attack_beta 1) adds wMSE."""
    torch.manual_seed(0)
    model = build_model("wrn-16-1", 10)
    x, y = _batch(8)
    results = {}
    for beta in (0.0, 1.0):
        method = IKLAT(10, attack_beta=beta)
        method.prior.copy_(torch.softmax(3 * torch.randn(10, 10), 1))
        torch.manual_seed(1)
        results[beta] = method.perturb(model, x, y, BUDGET)
    assert not torch.equal(results[0.0], results[1.0])
    with pytest.raises(ValueError, match="v2"):
        IKLAT(10, version="v1", gamma=0.5)


def test_lbgat_step_updates_both_models_and_its_kl_term():
    torch.manual_seed(0)
    model = build_model("wrn-16-1", 10)
    method = build_method({"name": "lbgat", "lbgat": {"beta": 6.0, "natural_model": "wrn-16-1"}},
                          10)
    optimizer = build_optimizer({"weight_decay": 0.0, "no_decay_bn": False, "lr": 0.1,
                                 "momentum": 0.0, "nesterov": False}, [model, method])
    # The natural model's parameters are trained by the same optimizer.
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == len(list(model.parameters())) + len(list(method.natural.parameters()))
    x, y = _batch()
    x_adv = method.perturb(model, x, y, BUDGET)
    robust = [p.detach().clone() for p in model.parameters()]
    natural = [p.detach().clone() for p in method.natural.parameters()]
    out = method.loss(model, x, y, x_adv)
    assert set(out.terms) == {"mse", "ce_natural", "kl"}
    torch.testing.assert_close(out.terms["mse"],
                               F.mse_loss(out.logits_adv, out.extra["logits_natural"]))
    optimizer.zero_grad()
    out.total().backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(robust, model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(natural, method.natural.parameters()))
    assert any(k.startswith("natural.") for k in method.state_dict())


def test_label_smoothing_matches_the_smoothed_target_definition():
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    method = build_method({"name": "standard", "standard": {}, "label_smoothing": 0.1}, 5)
    target = 0.9 * F.one_hot(y, 5) + 0.1 / 5
    expected = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(method.cross_entropy(logits, y), expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_method({"name": "standard", "standard": {}, "label_smoothing": 1.0}, 5)


def test_ikl_two_views_weight_the_augmented_view_and_feed_the_prior_the_basic_view():
    torch.manual_seed(0)
    model = build_model("wrn-16-1", 10).train()
    method = IKLAT(10, alpha=2.0, beta=5.0, aug_weight=0.3)
    method.views = 2  # what build_method sets for data.second_view
    method.prior.copy_(torch.softmax(torch.randn(10, 10), 1))
    x, y = _batch(8)
    x2, y2 = torch.cat([x, x.flip(3)]), torch.cat([y, y])
    x_adv = (x2 + 0.02).clamp(0, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = method.loss(model, x2, y2, x_adv)
    model.load_state_dict(state)
    logits_adv, logits_clean = model(x_adv), model(x2)  # one forward of all 2B rows per branch
    from at.losses import ikl_terms
    basic = ikl_terms(logits_adv[:8], logits_clean[:8], method.prior[y])
    aug = ikl_terms(logits_adv[8:], logits_clean[8:], method.prior[y])
    torch.testing.assert_close(out.terms["wmse"], 5.0 * (basic["wmse"] + 0.3 * aug["wmse"]))
    torch.testing.assert_close(out.terms["sce"], 2.0 * (basic["sce"] + 0.3 * aug["sce"]))
    torch.testing.assert_close(out.terms["ce"], F.cross_entropy(logits_clean, y2))
    assert len(out.logits_adv) == 16
    method.observe(y2, out)
    expected = torch.zeros(10, 10, dtype=torch.float64)
    expected.index_add_(0, y, F.softmax(out.logits_clean[:8].detach() / 4.0, 1).double())
    torch.testing.assert_close(method.prior_sum, expected)
