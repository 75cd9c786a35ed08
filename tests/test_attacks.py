"""PGD: stays in the eps-ball and the image box, raises its objective, leaves the model as found."""
import pytest
import torch
import torch.nn.functional as F

from attacks import frozen, pgd
from models import build_model


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = build_model("wrn-16-1", 10).eval()
    x = torch.rand(8, 3, 32, 32)
    x[:2] = x[:2].round()  # pixels at 0 and 1: the box constraint is active there
    y = torch.randint(0, 10, (8,))
    return model, x, y


def _ce(model, y):
    return lambda z: F.cross_entropy(model(z), y, reduction="none")


@pytest.mark.parametrize("norm,eps,step", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.125)])
@pytest.mark.parametrize("init", ["normal", "uniform", "none"])
def test_pgd_stays_in_ball_and_box_and_raises_objective(model_and_batch, norm, eps, step, init):
    model, x, y = model_and_batch
    x_before = x.clone()
    with frozen(model):
        x_adv = pgd(_ce(model, y), x, eps=eps, step_size=step, steps=5, norm=norm, init=init)
        before = F.cross_entropy(model(x), y, reduction="none")
        after = F.cross_entropy(model(x_adv), y, reduction="none")
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x, x_before) and not x_adv.requires_grad
    assert after.sum() > before.sum() + 0.1  # the attack works, not just moves
    assert (after >= before - 1e-4).float().mean() >= 0.75


def test_pgd_linf_uses_the_budget(model_and_batch):
    model, x, y = model_and_batch
    with frozen(model):
        x_adv = pgd(_ce(model, y), x, eps=8 / 255, step_size=2 / 255, steps=10, init="none")
    # Signed steps walk to the corners of the box: most pixels end on the boundary.
    interior = (x > 8 / 255) & (x < 1 - 8 / 255)
    on_boundary = ((x_adv - x).abs() - 8 / 255).abs() < 1e-6
    assert on_boundary[interior].float().mean() > 0.5


def test_pgd_random_starts():
    x = torch.full((4, 3, 8, 8), 0.5)
    zero = lambda z: z.sum() * 0  # noqa: E731 - an objective with no gradient signal
    start = pgd(zero, x, eps=0.1, step_size=0.0, steps=0, init="uniform")
    assert 0.09 < (start - x).abs().max() <= 0.1 + 1e-7
    small = pgd(zero, x, eps=0.1, step_size=0.0, steps=0, init="normal")
    assert 0 < (small - x).abs().max() < 0.01
    edge = torch.ones(2, 3, 4, 4)
    unclamped = pgd(zero, edge, eps=0.1, step_size=0.0, steps=0, init="normal", clamp_init=False)
    assert unclamped.max() <= 1  # the projection still clips the returned images
    with pytest.raises(ValueError, match="norm"):
        pgd(zero, x, eps=0.1, step_size=0.1, steps=1, norm="l3")
    with pytest.raises(ValueError, match="init"):
        pgd(zero, x, eps=0.1, step_size=0.1, steps=1, init="gauss")


def test_clamp_init_false_feeds_the_unclipped_start():
    edge = torch.ones(2, 3, 4, 4)
    seen = []
    def objective(z):
        seen.append(z.detach().clone())
        return z.sum()
    torch.manual_seed(0)
    pgd(objective, edge, eps=0.1, step_size=0.01, steps=1, init="normal", clamp_init=False)
    assert seen[0].max() > 1
    torch.manual_seed(0)
    seen.clear()
    pgd(objective, edge, eps=0.1, step_size=0.01, steps=1, init="normal", clamp_init=True)
    assert seen[0].max() <= 1


def test_frozen_restores_modes_and_requires_grad_even_on_error():
    model = build_model("wrn-16-1", 10).train()
    model.fc.weight.requires_grad_(False)  # a deliberately frozen layer must stay frozen
    with pytest.raises(RuntimeError):
        with frozen(model):
            assert not model.training and not any(m.training for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert model.training and all(m.training for m in model.modules())
    assert not model.fc.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "fc.weight")


def test_attack_does_not_touch_batchnorm_statistics(model_and_batch):
    model, x, y = model_and_batch
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen(model):
        pgd(_ce(model, y), x, eps=8 / 255, step_size=2 / 255, steps=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    model.eval()
