"""The CIFAR VGGs of the distillation benchmarks (vgg13 teacher, vgg8 student; CRD's layout):
five stages of 3x3 conv + BN + ReLU layers (widths 64, 128, 256, 512, 512), 2x2 max pooling
after the first four and global average pooling after the last, then one linear classifier.
Inputs in [0, 1], normalised inside the model like the CIFAR ResNets of models/cifar_resnet.py.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .cifar_resnet import normalized_builder

WIDTHS = (64, 128, 256, 512, 512)
LAYERS_PER_STAGE = {"vgg8": (1, 1, 1, 1, 1), "vgg11": (1, 1, 2, 2, 2), "vgg13": (2, 2, 2, 2, 2)}


class CifarVGG(nn.Module):
    def __init__(self, layers: tuple[int, ...], num_classes: int = 100,
                 mean: tuple[float, ...] = (0.0, 0.0, 0.0), std: tuple[float, ...] = (1.0,) * 3):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        stages, in_ch = [], 3
        for i, (width, n) in enumerate(zip(WIDTHS, layers)):
            stage = []
            for _ in range(n):
                stage += [nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width),
                          nn.ReLU(inplace=True)]
                in_ch = width
            stage.append(nn.MaxPool2d(2) if i < len(WIDTHS) - 1 else nn.AdaptiveAvgPool2d(1))
            stages.append(nn.Sequential(*stage))
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features((x - self.mean) / self.std).flatten(1))


def cifar_vgg(name: str):
    return normalized_builder(lambda num_classes, **kw: CifarVGG(LAYERS_PER_STAGE[name],
                                                                 num_classes, **kw))
