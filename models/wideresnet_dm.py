"""DeepMind-style WideResNet (Gowal et al. 2020, Rebuffi et al. 2021), Swish/SiLU by default,
with input normalization inside the model (inputs in [0, 1]).

State-dict keys and forward match RobustBench's
``model_zoo/architectures/dm_wide_resnet.py::DMWideResNet`` (with its default padding=0).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .wideresnet import init_weights

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
}


def normalization_for(num_classes: int, dataset: str | None = None
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for `dataset` if known, else RobustBench's rule: CIFAR-100 iff 100 classes."""
    key = dataset.lower() if dataset else None
    if key in NORMALIZATION:
        return NORMALIZATION[key]
    return NORMALIZATION["cifar100" if num_classes == 100 else "cifar10"]


class _Block(nn.Module):
    """Pre-activation block; same shortcut rule as the TRADES WRN, but TF-style padding."""

    def __init__(self, in_ch: int, out_ch: int, stride: int,
                 activation: type[nn.Module], bn_momentum: float) -> None:
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_ch, momentum=bn_momentum)
        self.act_0 = activation()
        self.conv_0 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_ch, momentum=bn_momentum)
        self.act_1 = activation()
        self.conv_1 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        if in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
        elif stride != 1:
            raise ValueError("identity shortcut requires stride 1")
        else:
            self.shortcut = None
        # The original model was trained in JAX/TF with "SAME" padding. For a 3x3,
        # stride-2 conv on an even-sized map SAME pads 0 before and 1 after; PyTorch's
        # symmetric padding=1 would shift the sampling grid by one pixel and give
        # different outputs from the same weights. (left, right, top, bottom) order.
        if stride == 1:
            self.pad = (1, 1, 1, 1)
        elif stride == 2:
            self.pad = (0, 1, 0, 1)
        else:
            raise ValueError(f"unsupported stride {stride}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act_0(self.batchnorm_0(x))
        out = self.conv_0(F.pad(pre, self.pad))
        out = self.conv_1(self.act_1(self.batchnorm_1(out)))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        return shortcut + out


class _BlockGroup(nn.Module):
    def __init__(self, n: int, in_ch: int, out_ch: int, stride: int,
                 activation: type[nn.Module], bn_momentum: float) -> None:
        super().__init__()
        self.block = nn.Sequential(*(
            _Block(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1,
                   activation, bn_momentum)
            for i in range(n)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """WRN-`depth`-`width` in the DeepMind layout; normalizes inputs with `mean`/`std`.

    `mean`/`std` are non-persistent buffers, so checkpoints carry no normalization and
    loading one never overrides the constants chosen here. `bn_momentum` defaults to
    PyTorch's 0.1; the DeepMind training recipe uses 0.01 (TF BN decay 0.99).
    Weights use the TRADES/WRN init (`init_weights`), as the DM reference training code does.
    """

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10,
                 activation: type[nn.Module] = nn.SiLU,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
                 bn_momentum: float = 0.1) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DMWideResNet depth must be 6n+4 with n >= 1, got {depth}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        n = (depth - 4) // 6
        w1, w2, w3 = 16 * width, 32 * width, 64 * width
        self.init_conv = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            _BlockGroup(n, 16, w1, 1, activation, bn_momentum),
            _BlockGroup(n, w1, w2, 2, activation, bn_momentum),
            _BlockGroup(n, w2, w3, 2, activation, bn_momentum),
        )
        self.batchnorm = nn.BatchNorm2d(w3, momentum=bn_momentum)
        self.act = activation()
        self.logits = nn.Linear(w3, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.init_conv((x - self.mean) / self.std)
        out = self.act(self.batchnorm(self.layer(out)))
        out = F.avg_pool2d(out, 8)  # 8x8 feature map for 32x32 inputs -> 1x1
        return self.logits(out.flatten(1))
