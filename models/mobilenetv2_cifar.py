"""MobileNetV2 at half width for CIFAR ("MobileNetV2" of the CIFAR-100 distillation benchmarks,
CRD's `mobile_half`): a stride-2 3x3 stem, inverted residual blocks (1x1 expansion by T = 6,
3x3 depthwise, 1x1 linear projection; a residual connection when shape is kept) in the
standard seven stages with widths scaled by 0.5, a 1x1 conv to 1280 channels, global average
pooling and a linear classifier. Inputs in [0, 1], normalised inside the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cifar_resnet import normalized_builder

# (expansion, output channels, blocks, stride of the first block); expansion None = T.
STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
          (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
             relu: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_ch)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class _InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(*_conv_bn(in_ch, hidden, 1),
                                  *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  *_conv_bn(hidden, out_ch, 1, relu=False))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class CifarMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, width: float = 0.5, expansion: int = 6,
                 mean: tuple[float, ...] = (0.0, 0.0, 0.0), std: tuple[float, ...] = (1.0,) * 3):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        in_ch = int(32 * width)
        layers: list[nn.Module] = [*_conv_bn(3, in_ch, 3, stride=2)]
        for t, c, n, s in STAGES:
            out_ch = int(c * width)
            for i in range(n):
                layers.append(_InvertedResidual(in_ch, out_ch, s if i == 0 else 1,
                                                expansion if t is None else t))
                in_ch = out_ch
        last = 1280 if width <= 1.0 else int(1280 * width)
        layers += _conv_bn(in_ch, last, 1)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.features((x - self.mean) / self.std)
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


mobilenetv2_half = normalized_builder(CifarMobileNetV2)
