"""Knowledge distillation end to end on the digits: a student learns from a trained teacher (a
run of this codebase), the teacher receives no gradient and keeps its weights, every loss and
the robust (adversarial) variant train, and the WKD cost matrix is deterministic."""
from __future__ import annotations

import errno
import os

import pytest
import torch
from conftest import DIGITS

from at.checkpoint import load
from at.config import load_config
from at.kd_cost_matrix import main as cost_matrix_main
from at.schedules import attack_budget
from at.trainer import Trainer, fit

# End-to-end runs: left out of the fast tier (sh/test.sh --fast).
pytestmark = pytest.mark.slow

STUDENT = ["model.name=resnet20", "method.name=distill", "data.val_size=0",
           "eval.final_pgd=false", "log.plot=false"]


def _cfg(tmp_path, name, teacher, *overrides):
    return load_config(DIGITS, [f"out_dir={tmp_path / name}", *STUDENT,
                                f"method.distill.teacher={teacher}", *overrides])


@pytest.fixture(scope="module")
def cost_file(learned, tmp_path_factory):
    path = tmp_path_factory.mktemp("cost") / "cost.pt"
    assert cost_matrix_main([str(learned["standard"][0]), "--out", str(path),
                             "--per-class", "20", "--device", "cpu"]) == 0
    return path


def test_distilled_student_learns_and_the_teacher_is_untouched(learned, tmp_path):
    teacher_run = learned["standard"][0]
    teacher_state = load(teacher_run / "best.pt")["model"]
    cfg = _cfg(tmp_path, "student", teacher_run, "method.distill.loss=ikl_kd",
               "method.distill.weights=class_prior", "method.distill.beta=4.0",
               "method.distill.prior_temperature=4.0", "method.distill.warmup=2",
               "optim.epochs=4")
    result = fit(cfg)
    assert result["last"]["test_clean_acc"] >= 85.0, result
    saved = load(tmp_path / "student" / "last.pt")
    for key, value in teacher_state.items():
        assert torch.equal(saved["method"][f"teacher.{key}"], value), key
    # The class prior was learned from the teacher's predictions: mass on the diagonal.
    prior = saved["method"]["prior"]
    assert torch.allclose(prior.sum(1), torch.ones(10)) and prior.diag().min() > 0.1


@pytest.mark.parametrize("loss,extra", [
    ("kd", []), ("dkd", ["method.distill.beta=8.0"]),
    ("ikl_kd", []), ("gkl_kd", ["method.distill.gamma=0.5", "method.distill.weights=class_prior"]),
    ("wkd_l", ["method.distill.kd_weight=50.0", "method.distill.temperature=2.0"]),
    ("kd", ["method.distill.inputs=adversarial", "attack.steps=2", "attack.schedule=fixed"]),
])
def test_each_loss_trains_the_student_only(learned, cost_file, tmp_path, loss, extra):
    cfg = _cfg(tmp_path, loss, learned["standard"][0], f"method.distill.loss={loss}",
               f"method.distill.cost_matrix={cost_file}", "optim.batch_size=32", *extra)
    t = Trainer(cfg)
    x = t.splits.train_x[:32].float() / 255
    y = t.splits.train_y[:32]
    t.loader.global_size = len(y)
    budget = attack_budget(cfg["attack"], 1, cfg["optim"]["epochs"])
    if t.method.uses_attack:
        x_adv = t.method.perturb(t.model, x, y, budget)
        assert 0 < (x_adv - x).abs().max() <= budget.eps + 1e-6
    out, loss_value = t._forward_backward(x, y, budget, None, 1)
    assert torch.isfinite(loss_value) and loss_value > 0
    assert set(out.terms) - {"ce"}, out.terms  # a distillation term is present
    grads = [p.grad for p in t.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in t.method.teacher.parameters())
    assert not t.method.teacher.training


def test_cost_matrix_is_deterministic_and_well_formed(learned, cost_file, tmp_path):
    again = tmp_path / "again.pt"
    assert cost_matrix_main([str(learned["standard"][0]), "--out", str(again),
                             "--per-class", "20", "--device", "cpu"]) == 0
    first, second = load(cost_file)["cost"], load(again)["cost"]
    assert torch.equal(first, second)
    assert torch.allclose(first, first.T) and first.diag().abs().max() < 1e-12
    off = first[~torch.eye(10, dtype=torch.bool)]
    assert (off > 0).all() and (off <= 1).all()


def _one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("at.kd_cost_matrix: error: ") and err.count("\n") == 1, err
    assert needle in err, err


@pytest.mark.parametrize("out,needle", [
    ("file/cost.pt", "file is not a directory"), ("missing/cost.pt", "missing does not exist"),
    (".", "is a directory")])
def test_cost_matrix_out_is_checked_before_the_computation(tmp_path, capsys, out, needle):
    (tmp_path / "file").write_text("keep me")
    # No such teacher either: the --out error coming first shows that nothing was loaded or
    # computed before it (ImageNet teachers take hours).
    assert cost_matrix_main([str(tmp_path / "no_run"), "--out", str(tmp_path / out),
                             "--device", "cpu"]) == 1
    _one_line_error(capsys, needle)
    assert (tmp_path / "file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe is gone


def test_negative_per_class_and_nan_costs_are_refused(tmp_path, capsys):
    assert cost_matrix_main([str(tmp_path / "no_run"), "--out", str(tmp_path / "c.pt"),
                             "--per-class", "-3", "--device", "cpu"]) == 1
    _one_line_error(capsys, "--per-class must be >= 0")
    assert not (tmp_path / "c.pt").exists()
    from at.cost_matrix import FORMAT, load_cost_matrix
    cost = torch.rand(10, 10)
    cost[2, 7] = float("nan")
    torch.save({"format": FORMAT, "kind": "cka", "cost": cost}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan.pt holds NaN/inf costs \(1 of them, the first "
                                         r"between classes 2 and 7\)"):
        load_cost_matrix(str(tmp_path / "nan.pt"), 10)


def test_cost_matrix_failed_save_keeps_the_previous_file(tmp_path, capsys, monkeypatch):
    # A one-epoch plain-training teacher is enough for the classifier-weight (fc) cost.
    teacher = tmp_path / "teacher"
    fit(load_config(DIGITS, [f"out_dir={teacher}", "method.name=standard", "optim.epochs=1",
                             "data.val_size=0", "eval.final_pgd=false", "log.plot=false"]))
    out = tmp_path / "costs" / "cost.pt"
    out.parent.mkdir()
    args = [str(teacher), "--out", str(out), "--kind", "fc", "--weights", "last",
            "--device", "cpu"]
    assert cost_matrix_main(args) == 0
    before = out.read_bytes()
    capsys.readouterr()

    def full_disk(obj, f, *a, **kw):
        f.write(b"half a cost matrix")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    assert cost_matrix_main(args) == 1
    _one_line_error(capsys, f"cannot write --out {out} (No space left on device)")
    assert out.read_bytes() == before and os.listdir(out.parent) == ["cost.pt"]


def test_missing_teacher_is_a_one_line_error(tmp_path):
    cfg = load_config(DIGITS, [f"out_dir={tmp_path / 'x'}", *STUDENT])
    with pytest.raises(ValueError, match="method.distill.teacher is required"):
        Trainer(cfg)
    cfg = _cfg(tmp_path, "y", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="method.distill.teacher: .*does not exist"):
        Trainer(cfg)


def _reference_class_maps(model, x, y, classes, per_class):
    """WKD's generate_class_proto with feature_type 'feature': the last stage's map of every
    image of each class, (m, c, h, w) -> (m * h * w, c) rows; the first images of each class in
    index order (its CIFAR loader does not shuffle)."""
    model.eval()
    feats = []
    for c in range(classes):
        xs = x[(y == c).nonzero().flatten()[:per_class]]
        with torch.no_grad():
            fmap = model.block3(model.block2(model.block1(model.conv1(xs))))  # feats[-1]
        m, ch, h, w = fmap.shape
        feats.append(fmap.view(m, ch, -1).transpose(-1, -2).reshape(-1, ch))
    return feats


def _reference_cka_cost(feats):
    """1 - linear CKA, ||F_j^T F_i||_F^2 / (||F_i^T F_i||_F ||F_j^T F_j||_F), centred F."""
    fs = [f.double() - f.double().mean(0, keepdim=True) for f in feats]
    cost = torch.zeros(len(fs), len(fs), dtype=torch.float64)
    for i, fi in enumerate(fs):
        for j, fj in enumerate(fs):
            cost[i, j] = 1 - (fj.T @ fi).norm() ** 2 / ((fi.T @ fi).norm() * (fj.T @ fj).norm())
    return cost


@pytest.mark.parametrize("features", ["map", "logits"])
def test_cost_matrix_uses_wkds_class_prototypes(learned, tmp_path, features):
    """Every spatial position of the last feature map (CIFAR), or logits (ImageNet), of the
    first 12 training images of each class; compared with a literal reference computation."""
    import data as datasets
    from at.target import load_target
    run = learned["standard"][0]
    out = tmp_path / f"{features}.pt"
    assert cost_matrix_main([str(run), "--out", str(out), "--per-class", "12", "--device", "cpu",
                             "--features", features]) == 0
    got = load(out)["cost"]
    target = load_target(str(run), "best", device="cpu")
    model = target.model.double()
    x, y = datasets.DATASETS["digits"]("train", target.data_root, False)
    x = x.double() / 255
    if features == "map":
        feats = _reference_class_maps(model, x, y, 10, 12)
        assert feats[0].shape == (12 * 64, model.fc.in_features)  # 8 x 8 positions per image
    else:
        with torch.no_grad():
            feats = [model(x[(y == c).nonzero().flatten()[:12]]) for c in range(10)]
    torch.testing.assert_close(got, _reference_cka_cost(feats), rtol=1e-5, atol=1e-6)
