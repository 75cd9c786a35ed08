"""The L1 threat model: the projections land in the ball (and the box), are idempotent and are
the nearest feasible points (checked against brute force in 2 and 3 dimensions); PGD under L1
stays in the threat model and lowers a trained model's accuracy."""
from __future__ import annotations

import itertools

import pytest
import torch

from attacks.accuracy import correct
from attacks.l1 import l1_random_start, l1_step, project_l1_ball, project_l1_box
from attacks.pgd import eps_problem, pgd, project


def _l1(v):
    return v.flatten(1).abs().sum(1)


def test_l1_ball_projection_is_inside_idempotent_and_sparse():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64) * 3
    for eps in (0.5, 4.0, 1e3):
        p = project_l1_ball(v, eps)
        assert (_l1(p) <= eps * (1 + 1e-12)).all()
        outside = _l1(v) > eps
        # points outside land on the sphere, points inside do not move
        torch.testing.assert_close(_l1(p)[outside], torch.full_like(_l1(p)[outside], eps))
        torch.testing.assert_close(p[~outside], v[~outside])
        torch.testing.assert_close(project_l1_ball(p, eps), p)
        # soft thresholding: never flips a sign, only shrinks magnitudes
        assert ((p * v) >= 0).all() and (p.abs() <= v.abs()).all()


def _brute_force_nearest(v, feasible, grid):
    """The nearest point of a fine grid that satisfies `feasible`."""
    pts = torch.tensor(list(itertools.product(grid, repeat=len(v))), dtype=torch.float64)
    pts = pts[feasible(pts)]
    return pts[(pts - v).norm(dim=1).argmin()]


@pytest.mark.parametrize("dim", [2, 3])
def test_l1_projections_are_optimal_against_brute_force(dim):
    g = torch.Generator().manual_seed(dim)
    grid = torch.linspace(-1, 1, 201 if dim == 2 else 81, dtype=torch.float64).tolist()
    step = 2 / (len(grid) - 1)
    for _ in range(12):
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        eps = float(torch.rand(1, generator=g)) * 0.9 + 0.1
        p = project_l1_ball(v[None], eps)[0]
        best = _brute_force_nearest(v, lambda q: q.abs().sum(1) <= eps, grid)
        # no feasible grid point is nearer than the projection (up to the grid's resolution)
        assert (v - p).norm() <= (v - best).norm() + 1e-12
        assert (p - best).norm() <= 2 * step * dim

        x = torch.rand(dim, generator=g, dtype=torch.float64)
        d = project_l1_box(v[None], x[None], eps)[0]

        def in_both(q, x=x, eps=eps):
            return (q.abs().sum(1) <= eps) & ((x + q) >= 0).all(1) & ((x + q) <= 1).all(1)

        best = _brute_force_nearest(v, in_both, grid)
        assert in_both(d[None]).all()
        assert (v - d).norm() <= (v - best).norm() + 1e-9
        assert (d - best).norm() <= 2 * step * dim
        # clamping the plain L1 projection to the box is feasible but never nearer
        naive = (x + project_l1_ball(v[None], eps)[0]).clamp(0, 1) - x
        assert (v - d).norm() <= (v - naive).norm() + 1e-12


def test_l1_box_projection_respects_box_ball_and_is_idempotent():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 3, 8, 8, generator=g)
    x[:4] = x[:4].round()  # pixels at the box's faces
    delta = torch.randn(32, 3, 8, 8, generator=g) * 0.5
    for eps in (1.0, 12.0, 500.0):
        d = project_l1_box(delta, x, eps)
        assert (_l1(d) <= eps * (1 + 1e-6)).all()
        assert ((x + d) >= 0).all() and ((x + d) <= 1).all()
        torch.testing.assert_close(project_l1_box(d, x, eps), d, rtol=0, atol=1e-6)
        adv = project(x + delta, x, eps, "l1")
        torch.testing.assert_close(adv - x, d, rtol=0, atol=1e-6)


def test_l1_random_start_and_step():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(500, 3, 8, 8, generator=g)
    start = l1_random_start(x, 12.0, g)
    assert (_l1(start - x) <= 12.0 + 1e-4).all() and start.min() >= 0 and start.max() <= 1
    # uniform in the ball of dimension d: the radius is eps * U^(1/d), close to eps
    unclipped = l1_random_start(torch.full_like(x, 0.5), 12.0, g) - 0.5
    assert _l1(unclipped).mean() > 11.5
    grad = torch.randn(4, 3, 8, 8, generator=g)
    step = l1_step(grad, 2.0)
    torch.testing.assert_close(_l1(step), torch.full((4,), 2.0))
    assert ((step * grad) >= 0).all() and (step != 0).flatten(1).sum(1).max() <= 2


def test_l1_eps_problems():
    assert eps_problem("--eps", 12, "l1", 3 * 32 * 32) is None
    assert "l1 diameter" in eps_problem("--eps", 4000, "l1", 3 * 32 * 32)


def test_l1_pgd_on_a_trained_model_stays_in_the_threat_model(learned):
    from at.target import load_target
    from eval.common import load_test_data
    t = load_target(learned["ikl_at"][0], "best", device="cpu")
    x, y = load_test_data(t, 64)
    with torch.no_grad():
        clean = t.model(x).argmax(1) == y
    adv = pgd(lambda z: torch.nn.functional.cross_entropy(t.model(z), y), x, eps=12.0,
              step_size=3.0, steps=10, norm="l1")
    assert (_l1(adv - x) <= 12.0 + 1e-3).all() and adv.min() >= 0 and adv.max() <= 1
    robust = correct(t.model, x, y, eps=12.0, steps=10, step_size=3.0, norm="l1")
    assert robust.sum() < clean.sum()
