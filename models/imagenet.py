"""ImageNet networks of the distillation benchmarks: torchvision's ResNet-18/34/50 and
ResNeXt-101 (32x4d), and MobileNetV1 (Howard et al. 2017) as the KD code bases define it.

Each takes images in [0, 1] and normalizes them inside with the ImageNet mean and std, like the
CIFAR models, so that attacks and augmentation work in pixel space. The torchvision network is
the `net` submodule: `net` loads torchvision's own checkpoints unchanged (`load_pretrained`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .bn import set_bn_momentum


def _tv():
    """torchvision's models, imported when an ImageNet network is built: importing torchvision
    takes about as long as importing torch, which every command that never builds one (every
    CIFAR evaluation, at.sweep's argument check) would otherwise pay."""
    from torchvision import models
    return models

TORCHVISION_PREFIX = "torchvision:"  # a teacher spec: torchvision:resnet34 = torchvision's weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's checkpoints of the teachers (top-1 on the ImageNet validation set, as published
# with the weights): ResNet-34 73.314, ResNet-50 76.130 (the V1 weights the KD papers use).
PRETRAINED = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1",
              "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
              "resnet50": "ResNet50_Weights.IMAGENET1K_V1"}


class ImageNetModel(nn.Module):
    """x in [0, 1], N x 3 x H x W -> logits; normalization, then `net`."""

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MobileNetV1(nn.Module):
    """MobileNetV1, width 1.0: a stride-2 3x3 stem, thirteen depthwise-separable blocks
    (3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU), global average pool, linear
    (4.23M parameters for 1000 classes)."""

    # (output channels, stride) of the depthwise-separable blocks.
    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
              (1024, 2), (1024, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, cin = _conv_bn(3, 32, 3, 2), 32
        for cout, stride in self.BLOCKS:
            layers += _conv_bn(cin, cin, 3, stride, groups=cin) + _conv_bn(cin, cout, 1, 1)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _resnext101_32x4d(num_classes: int) -> nn.Module:
    tv = _tv()
    return tv.resnet.ResNet(tv.resnet.Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4,
                            num_classes=num_classes)


NETWORKS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": lambda c: _tv().resnet18(num_classes=c),
    "resnet34": lambda c: _tv().resnet34(num_classes=c),
    "resnet50": lambda c: _tv().resnet50(num_classes=c),
    "resnext101-32x4d": _resnext101_32x4d,
    "mobilenetv1": MobileNetV1,
}


def imagenet_builder(name: str) -> Callable[..., ImageNetModel]:
    def build(num_classes: int, dataset: str | None = None, bn_momentum: float = 0.1
              ) -> ImageNetModel:
        return set_bn_momentum(ImageNetModel(NETWORKS[name](num_classes)), bn_momentum)
    return build


def load_pretrained(model: ImageNetModel, name: str) -> ImageNetModel:
    """torchvision's ImageNet weights of `name` into `model.net` (downloaded into the torch hub
    cache on first use; a one-line error without network or cache)."""
    if name not in PRETRAINED:
        raise ValueError(f"no torchvision weights for {name!r}; available: "
                         f"{', '.join(PRETRAINED)}")
    weights = _tv().get_weight(PRETRAINED[name])
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # URLError, HTTPError, hash mismatch: all mean "no weights"
        raise ValueError(f"could not get torchvision's {PRETRAINED[name]} weights ({err}); "
                         f"download them once with network access (torch hub cache: "
                         f"{torch.hub.get_dir()})") from None
    model.net.load_state_dict(state)
    return model


def torchvision_model(spec: str) -> ImageNetModel:
    """`torchvision:NAME` -> our NAME (1000 classes) holding torchvision's ImageNet weights."""
    name = spec[len(TORCHVISION_PREFIX):] if spec.startswith(TORCHVISION_PREFIX) else spec
    if name not in PRETRAINED:
        raise ValueError(f"no torchvision weights for {name!r}; available: "
                         f"{', '.join(PRETRAINED)}")
    return load_pretrained(imagenet_builder(name)(1000), name)
