"""ShuffleNet V1 (groups 3) and V2 (1x) for CIFAR, the students of the CIFAR-100 distillation
benchmarks (CRD's `ShuffleV1` / `ShuffleV2` layouts): a stride-1 stem, three stages that each
start at stride 2 (32 -> 16 -> 8 -> 4 pixels), 4x4 average pooling and a linear classifier.
Inputs in [0, 1], normalised inside the model.

V1 unit: grouped 1x1 conv (ungrouped after the 24-channel stem), channel shuffle, 3x3 depthwise,
grouped 1x1 conv; the stride-2 unit concatenates a 3x3 average-pooled shortcut, the others add
the identity. V2 unit: half of the channels pass through, the other half go 1x1 -> 3x3
depthwise -> 1x1; concatenation and a shuffle; its stride-2 unit processes both halves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cifar_resnet import normalized_builder


def shuffle(x: Tensor, groups: int) -> Tensor:
    """Channel shuffle: N x (g*c) x H x W -> interleave the g groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _bn_conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
             ) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return (nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch))


class _Normalized(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class _UnitV1(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int):
        super().__init__()
        mid = out_ch // 4
        self.first_groups = 1 if in_ch == 24 else groups
        self.stride = stride
        self.conv1, self.bn1 = _bn_conv(in_ch, mid, 1, groups=self.first_groups)
        self.conv2, self.bn2 = _bn_conv(mid, mid, 3, stride, groups=mid)
        self.conv3, self.bn3 = _bn_conv(mid, out_ch, 1, groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        out = shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(_Normalized):
    def __init__(self, num_classes: int = 100, widths: tuple[int, ...] = (240, 480, 960),
                 blocks: tuple[int, ...] = (4, 8, 4), groups: int = 3,
                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__(mean, std)
        self.conv1, self.bn1 = _bn_conv(3, 24, 1)
        units, in_ch = [], 24
        for width, n in zip(widths, blocks):
            for i in range(n):
                # The stride-2 unit concatenates its input: its branch makes the rest.
                units.append(_UnitV1(in_ch, width - in_ch if i == 0 else width,
                                     2 if i == 0 else 1, groups))
                in_ch = width
        self.units = nn.Sequential(*units)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        return self.fc(F.adaptive_avg_pool2d(self.units(out), 1).flatten(1))


class _UnitV2(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1, self.bn1 = _bn_conv(half, half, 1)
        self.conv2, self.bn2 = _bn_conv(half, half, 3, groups=half)
        self.conv3, self.bn3 = _bn_conv(half, half, 1)

    def forward(self, x: Tensor) -> Tensor:
        keep, work = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(work)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return shuffle(torch.cat([keep, out], 1), 2)


class _DownV2(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        mid = out_ch // 2
        self.conv1, self.bn1 = _bn_conv(in_ch, in_ch, 3, 2, groups=in_ch)
        self.conv2, self.bn2 = _bn_conv(in_ch, mid, 1)
        self.conv3, self.bn3 = _bn_conv(in_ch, mid, 1)
        self.conv4, self.bn4 = _bn_conv(mid, mid, 3, 2, groups=mid)
        self.conv5, self.bn5 = _bn_conv(mid, mid, 1)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(_Normalized):
    def __init__(self, num_classes: int = 100, widths: tuple[int, ...] = (116, 232, 464),
                 blocks: tuple[int, ...] = (3, 7, 3), last: int = 1024,
                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__(mean, std)
        self.conv1, self.bn1 = _bn_conv(3, 24, 3)
        units, in_ch = [], 24
        for width, n in zip(widths, blocks):
            units.append(_DownV2(in_ch, width))
            units += [_UnitV2(width) for _ in range(n)]
            in_ch = width
        self.units = nn.Sequential(*units)
        self.conv2, self.bn2 = _bn_conv(in_ch, last, 1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = F.relu(self.bn2(self.conv2(self.units(out))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


shufflenet_v1 = normalized_builder(ShuffleNetV1)
shufflenet_v2 = normalized_builder(ShuffleNetV2)
