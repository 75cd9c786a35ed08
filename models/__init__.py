"""Model registry: `MODELS` maps a name to a constructor `(num_classes, **kwargs) -> nn.Module`;
`build_model` resolves the name and, for the DeepMind (swish) models, the normalization.
All models take N x 3 x H x W inputs in [0, 1] and return N x num_classes logits: H = W = 32 for
`MODELS`; for the image-file datasets (ImageNet, ImageNet-LT) the names resolve in
`IMAGENET_MODELS` (any H = W >= 32; 224 in the recipes).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from data import FOLDER_DATASETS
from errors import ConfigError, unknown

from .cifar_resnet import CifarResNet, CifarResNet50, cifar_resnet, normalized_builder
from .imagenet import NETWORKS as _IMAGENET_NETWORKS
from .imagenet import (
    TORCHVISION_PREFIX,
    ImageNetModel,
    MobileNetV1,
    imagenet_builder,
    load_pretrained,
    torchvision_model,
)
from .mobilenetv2_cifar import CifarMobileNetV2, mobilenetv2_half
from .preact_resnet import PreActResNet, preact_resnet18
from .shufflenet_cifar import ShuffleNetV1, ShuffleNetV2, shufflenet_v1, shufflenet_v2
from .vgg_cifar import CifarVGG, cifar_vgg
from .wideresnet import WideResNet
from .wideresnet_dm import NORMALIZATION, DMWideResNet, normalization_for

__all__ = ["IMAGENET_MODELS", "MODELS", "NORMALIZATION", "build_model",
           "normalization_for", "ImageNetModel", "MobileNetV1", "load_pretrained",
           "TORCHVISION_PREFIX", "torchvision_model",
           "WideResNet", "DMWideResNet", "PreActResNet", "preact_resnet18", "CifarResNet",
           "CifarResNet50", "CifarVGG", "CifarMobileNetV2", "ShuffleNetV1", "ShuffleNetV2"]


def _wrn(depth: int, widen_factor: int) -> Callable[..., WideResNet]:
    def build(num_classes: int, **kwargs: Any) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes, **kwargs)
    return build


def _dm_wrn(depth: int, width: int) -> Callable[..., DMWideResNet]:
    def build(num_classes: int, dataset: str | None = None, **kwargs: Any) -> DMWideResNet:
        # Explicit mean/std win; otherwise derive them from dataset / num_classes.
        mean, std = normalization_for(num_classes, dataset)
        kwargs.setdefault("mean", mean)
        kwargs.setdefault("std", std)
        return DMWideResNet(depth, width, num_classes, **kwargs)
    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "wrn-16-1": _wrn(16, 1),
    "wrn-16-4": _wrn(16, 4),
    "wrn-28-10": _wrn(28, 10),
    "wrn-34-10": _wrn(34, 10),
    "wrn-16-1-swish": _dm_wrn(16, 1),  # tiny DM model, for fast CPU tests
    "wrn-28-10-swish": _dm_wrn(28, 10),
    "wrn-70-16-swish": _dm_wrn(70, 16),
    "preact-resnet18": preact_resnet18,
    # Teachers and students of the CIFAR-100 distillation benchmarks (CRD / DKD / IKL-KD / WKD).
    "wrn-40-2": _wrn(40, 2),
    "wrn-40-1": _wrn(40, 1),
    "wrn-16-2": _wrn(16, 2),
    "resnet20": cifar_resnet(20, (16, 16, 32, 64)),
    "resnet32": cifar_resnet(32, (16, 16, 32, 64)),
    "resnet56": cifar_resnet(56, (16, 16, 32, 64)),
    "resnet110": cifar_resnet(110, (16, 16, 32, 64)),
    "resnet8x4": cifar_resnet(8, (32, 64, 128, 256)),
    "resnet32x4": cifar_resnet(32, (32, 64, 128, 256)),
    "resnet50": normalized_builder(CifarResNet50),
    "vgg8": cifar_vgg("vgg8"),
    "vgg13": cifar_vgg("vgg13"),
    "mobilenetv2": mobilenetv2_half,  # half width, CRD's "MobileNetV2" (0.81M parameters)
    "shufflenet-v1": shufflenet_v1,
    "shufflenet-v2": shufflenet_v2,
}

# ImageNet-sized networks, for the image-file datasets (the same name may mean a CIFAR network
# in MODELS: resnet50).
IMAGENET_MODELS: dict[str, Callable[..., nn.Module]] = {
    name: imagenet_builder(name) for name in _IMAGENET_NETWORKS}

# The CIFAR networks of the distillation benchmarks (not RobustBench architectures).
KD_PREFIXES = ("resnet", "vgg", "mobilenet", "shufflenet")
# Models that normalize inside and therefore care about `dataset`.
_DATASET_AWARE = frozenset(name for name in MODELS if name.endswith("-swish")
                           or name.startswith(KD_PREFIXES))


def build_model(name: str, num_classes: int, dataset: str | None = None,
                **kwargs: Any) -> nn.Module:
    """Instantiate `MODELS[name]`, or `IMAGENET_MODELS[name]` when `dataset` is an image-file
    dataset (imagenet, imagenet_lt). Otherwise `dataset` ("cifar10"/"cifar100") only selects the
    in-model normalization of the swish models; other/None falls back to CIFAR-100
    stats iff num_classes == 100 (RobustBench's convention). Extra kwargs (e.g.
    `bn_momentum`) go to the constructor."""
    registry = IMAGENET_MODELS if dataset in FOLDER_DATASETS else MODELS
    if name not in registry:
        raise unknown("model", name, sorted(registry), match=name.lower())
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if registry is IMAGENET_MODELS:
        return registry[name](num_classes, **kwargs)
    if name in _DATASET_AWARE:
        kwargs["dataset"] = dataset
    return MODELS[name](num_classes, **kwargs)
