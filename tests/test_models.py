"""Tests for models/: registry, output shapes, and exact equivalence with RobustBench's
architectures (strict state_dict load + equal logits). RobustBench's architecture files are
loaded directly from disk because importing the `robustbench` package itself pulls in
dependencies that are not installed here."""
from __future__ import annotations

import re
from types import ModuleType

import pytest
import torch
from torch import nn

from eval.robustbench_arch import architecture_module
from models import KD_PREFIXES, MODELS, NORMALIZATION, build_model, normalization_for

CIFAR10 = NORMALIZATION["cifar10"]
CIFAR100 = NORMALIZATION["cifar100"]
SMALL = ["wrn-16-1", "wrn-16-4", "wrn-16-1-swish", "preact-resnet18", "resnet8x4", "resnet20",
         "vgg8", "mobilenetv2", "shufflenet-v1", "shufflenet-v2"]
# The architectures RobustBench has (the adversarial-training models); the CIFAR ResNets of the
# distillation benchmarks are not among them.
ROBUSTBENCH = sorted(n for n in MODELS if not n.startswith(KD_PREFIXES))


def _rb_arch(stem: str) -> ModuleType:
    """robustbench/model_zoo/architectures/<stem>.py, loaded without importing robustbench."""
    module = architecture_module(stem)
    if module is None:
        pytest.skip(f"robustbench (or its {stem}.py) is not installed")
    return module


def _rb_twin(name: str, num_classes: int, mean=None, std=None, preact_block: str = "PreActBlockV2"
             ) -> nn.Module:
    """RobustBench's counterpart of MODELS[name]."""
    if name == "preact-resnet18":
        rn = _rb_arch("resnet")
        if preact_block == "PreActBlockV2":
            return rn.PreActResNet(rn.PreActBlockV2, [2, 2, 2, 2], num_classes=num_classes,
                                   bn_before_fc=True)
        # Rice2020OverfittingNet's spelling of the same network.
        return rn.PreActResNet(rn.PreActBlock, [2, 2, 2, 2], num_classes=num_classes,
                               bn_before_fc=True, out_shortcut=True)
    depth, width, swish = re.fullmatch(r"wrn-(\d+)-(\d+)(-swish)?", name).groups()
    if swish:
        return _rb_arch("dm_wide_resnet").DMWideResNet(
            num_classes=num_classes, depth=int(depth), width=int(width),
            activation_fn=nn.SiLU, mean=mean, std=std)
    return _rb_arch("wide_resnet").WideResNet(depth=int(depth), widen_factor=int(width),
                                              num_classes=num_classes, sub_block1=False)


@torch.no_grad()
def _randomize(model: nn.Module) -> None:
    """Non-default BN stats/affine and Linear bias, so equivalence is not trivially met."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
        elif isinstance(m, nn.Linear):
            m.bias.normal_(0.0, 0.2)


@torch.no_grad()
def _assert_same_logits(ours: nn.Module, theirs: nn.Module) -> torch.Tensor:
    _randomize(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    bn = next(m for m in theirs.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # load took effect
    x = torch.rand(4, 3, 32, 32)
    ref = theirs(x)
    out = ours(x)
    assert ref.std() > 1e-3 and not torch.allclose(ref[0], ref[1])  # non-degenerate logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
    return ref


def test_registry_names():
    assert set(MODELS) == {"wrn-16-1", "wrn-16-4", "wrn-28-10", "wrn-34-10", "wrn-16-1-swish",
                           "wrn-28-10-swish", "wrn-70-16-swish", "preact-resnet18",
                           "wrn-40-2", "wrn-40-1", "wrn-16-2", "resnet20", "resnet32",
                           "resnet56", "resnet110", "resnet8x4", "resnet32x4", "resnet50",
                           "vgg8", "vgg13", "mobilenetv2", "shufflenet-v1", "shufflenet-v2"}


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_meta(name, num_classes):
    # Meta tensors carry shapes only: this covers WRN-70-16 (~267M params) at no cost.
    with torch.device("meta"):
        model = build_model(name, num_classes).eval()
        out = model(torch.empty(2, 3, 32, 32))
    assert out.shape == (2, num_classes)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", SMALL)
def test_output_shape_real(name, num_classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", SMALL)
def test_backward_in_train_mode(name):
    # Guards against in-place activations breaking autograd.
    torch.manual_seed(0)
    model = build_model(name, 10).train()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    model(x).logsumexp(1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ROBUSTBENCH)
def test_state_dict_keys_match_robustbench(name):
    # Key names and shapes for every model, the huge ones included (meta device, no memory).
    num_classes = 100
    with torch.device("meta"):
        ours = build_model(name, num_classes)
        theirs = _rb_twin(name, num_classes, *CIFAR100)
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    theirs_shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes


def test_parameter_counts():
    expected = {"wrn-28-10": 36_479_194, "wrn-34-10": 46_160_474,
                "wrn-70-16-swish": 266_796_506, "preact-resnet18": 11_172_170}
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in build_model(n, 10).parameters()) for n in expected}
    assert counts == expected


def test_distillation_models_have_the_published_sizes():
    """CIFAR-100 parameter counts of the KD benchmark networks (CRD's table, in millions)."""
    published = {"resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.74,
                 "resnet8x4": 1.23, "resnet32x4": 7.43, "resnet50": 23.71, "wrn-16-2": 0.70,
                 "wrn-40-1": 0.57, "wrn-40-2": 2.26, "vgg8": 3.96, "vgg13": 9.46,
                 "mobilenetv2": 0.81, "shufflenet-v1": 0.95, "shufflenet-v2": 1.36}
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in build_model(n, 100).parameters()) / 1e6
                  for n in published}
    assert counts == pytest.approx(published, abs=0.01)


def test_unknown_name():
    with pytest.raises(ValueError) as exc:
        build_model("wrn-34-11", 10)
    msg = str(exc.value)
    assert "'wrn-34-11'" in msg and "\n" not in msg
    assert all(name in msg for name in MODELS)
    assert "did you mean 'wrn-34-10'" in msg


@pytest.mark.parametrize("name,num_classes", [("wrn-16-1", 10), ("wrn-16-4", 100),
                                              ("wrn-34-10", 100)])
def test_wrn_matches_robustbench(name, num_classes):
    torch.manual_seed(0)
    _assert_same_logits(build_model(name, num_classes), _rb_twin(name, num_classes))


@pytest.mark.parametrize("name,num_classes,dataset", [
    ("wrn-16-1-swish", 10, "cifar10"), ("wrn-16-1-swish", 100, "cifar100"),
    ("wrn-28-10-swish", 10, "cifar10"), ("wrn-28-10-swish", 100, "cifar100")])
def test_dm_wrn_matches_robustbench(name, num_classes, dataset):
    torch.manual_seed(0)
    mean, std = NORMALIZATION[dataset]
    ours = build_model(name, num_classes, dataset=dataset)
    theirs = _rb_twin(name, num_classes, mean, std)
    assert torch.equal(ours.mean, theirs.mean) and torch.equal(ours.std, theirs.std)
    _assert_same_logits(ours, theirs)


@pytest.mark.parametrize("block", ["PreActBlockV2", "PreActBlock(out_shortcut=True)"])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_preact_resnet18_matches_robustbench(num_classes, block):
    torch.manual_seed(0)
    _assert_same_logits(build_model("preact-resnet18", num_classes),
                        _rb_twin("preact-resnet18", num_classes, preact_block=block))


def test_dm_symmetric_padding_would_break_equivalence():
    # Same weights, but PyTorch-style symmetric padding in the stride-2 convs: the output
    # shape is unchanged, yet logits no longer match RobustBench.
    torch.manual_seed(0)
    ours = build_model("wrn-16-1-swish", 10)
    ref = _assert_same_logits(ours, _rb_twin("wrn-16-1-swish", 10, *CIFAR10))
    patched = [m for m in ours.modules() if getattr(m, "pad", None) == (0, 1, 0, 1)]
    assert len(patched) == 2  # first block of groups 2 and 3
    for m in patched:
        m.pad = (1, 1, 1, 1)
    torch.manual_seed(0)  # same input as in _assert_same_logits
    with torch.no_grad():
        out = ours(torch.rand(4, 3, 32, 32))
    assert out.shape == ref.shape
    assert not torch.allclose(out, ref, atol=1e-3, rtol=1e-3)


def test_dm_normalization_buffers():
    model = build_model("wrn-28-10-swish", 100, dataset="cifar100")
    assert torch.allclose(model.mean.flatten(), torch.tensor(CIFAR100[0]))
    assert torch.allclose(model.std.flatten(), torch.tensor(CIFAR100[1]))
    assert model.mean.shape == (3, 1, 1)
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


@pytest.mark.parametrize("num_classes,dataset,expected", [
    (100, None, CIFAR100), (10, None, CIFAR10), (100, "svhn", CIFAR100), (10, "svhn", CIFAR10),
    (100, "cifar10", CIFAR10), (10, "cifar100", CIFAR100), (10, "CIFAR100", CIFAR100)])
def test_dm_normalization_selection(num_classes, dataset, expected):
    assert normalization_for(num_classes, dataset) == expected
    model = build_model("wrn-16-1-swish", num_classes, dataset=dataset)
    assert torch.allclose(model.mean.flatten(), torch.tensor(expected[0]))
    assert torch.allclose(model.std.flatten(), torch.tensor(expected[1]))


def test_explicit_mean_std_override_dataset():
    model = build_model("wrn-16-1-swish", 10, dataset="cifar100", mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.equal(model.mean.flatten(), torch.full((3,), 0.5))
    assert torch.equal(model.std.flatten(), torch.full((3,), 0.25))


@pytest.mark.parametrize("name", SMALL)
def test_bn_momentum_kwarg(name):
    model = build_model(name, 10, bn_momentum=0.01)
    momenta = {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.01}


def test_init_rule():
    torch.manual_seed(0)
    for name in ["wrn-16-4", "wrn-16-1-swish"]:
        model = build_model(name, 10)
        conv = max((m for m in model.modules() if isinstance(m, nn.Conv2d)),
                   key=lambda m: m.weight.numel())
        expected_std = (2.0 / (9 * conv.out_channels)) ** 0.5
        assert abs(conv.weight.std().item() / expected_std - 1) < 0.05
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            elif isinstance(m, nn.Linear):
                assert torch.all(m.bias == 0)
